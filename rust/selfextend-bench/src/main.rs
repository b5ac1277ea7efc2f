//! `selfextend-bench`: times prefill and decode of a model with plain attention and
//! with SelfExtend, in one run, and reports medians.

mod kernels;
mod machine;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use clap::Parser;
use rand::{Rng, SeedableRng};
use selfextend_core::config::Config;
use selfextend_core::model::{
    parse_attention, parse_device, parse_dtype, parse_kv_cache_dtype, BatchLayout, LogitsFor,
    SequenceStep,
};
use selfextend_core::{Model, SelfExtend};
use serde::Serialize;

use machine::Machine;

/// Benchmark prefill and decode speed, plain attention vs SelfExtend.
///
/// Prompts are random token ids (the content does not change the cost). Prefill is
/// timed from an empty cache; decode is timed over `--decode-tokens` single-token
/// steps right after the prefill of `--decode-context` tokens, reusing its cache.
/// Every measurement is repeated `--repeats` times and the median is reported (off the
/// CPU, or with `--warm-up`, after an untimed warm-up). Peak RSS is the whole
/// process's: use `--attention` to measure one kind alone. On CUDA
/// the report adds the device's memory in use (all processes, as `nvidia-smi` counts
/// it), sampled after load and between the layers of every prefill chunk and decode
/// step; its maximum is the peak GPU memory.
///
/// SelfExtend has two knobs: the neighbor window W keeps exact positions for the W
/// closest keys, and the group size G floor-divides the positions of farther ones, so a
/// model trained on L tokens covers about (L - W) * G + W tokens.
///
/// Example:
///   selfextend-bench --model path/to/llama --prefill 1024,4096 --decode-context 4096 \
///       --group-size 4 --window 512 --json
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// A GGUF file, or a directory with config.json, tokenizer.json and safetensors.
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated prompt lengths to time prefill at.
    #[arg(long, value_delimiter = ',', default_values_t = [512usize, 2048])]
    prefill: Vec<usize>,
    /// Context length to time decode at (0 skips decode).
    #[arg(long, default_value_t = 2048)]
    decode_context: usize,
    /// Tokens to decode per decode measurement.
    #[arg(long, default_value_t = 16)]
    decode_tokens: usize,
    /// Sequences decoded together (one batched forward pass per step, as the serving
    /// engine runs them), each after its own prefill of `--decode-context` tokens.
    /// Decode tokens/s then counts the tokens of all of them.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// How a batch's decode steps use the threads: `auto` (as the serving engine does),
    /// `together` (every matmul shared by all threads) or `halves` (two halves of the
    /// batch side by side, each on a thread of its own).
    #[arg(long, value_enum, default_value_t = Layout::Auto)]
    batch_layout: Layout,
    /// SelfExtend group size G.
    #[arg(long, default_value_t = 4)]
    group_size: usize,
    /// SelfExtend neighbor window W.
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Prefill chunk length.
    #[arg(long, default_value_t = selfextend_core::model::DEFAULT_CHUNK_SIZE)]
    chunk_size: usize,
    /// Repetitions per measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Compute dtype: f32, bf16 or f16. Naming one dequantizes a GGUF model into a
    /// dense one; by default quantized weights stay quantized and compute is f32.
    #[arg(long)]
    dtype: Option<String>,
    /// Device: cpu, cuda, cuda:N or metal (if compiled in).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// KV cache dtype: f32, f16 or bf16. By default f16 for quantized weights on the
    /// CPU, else the compute dtype.
    #[arg(long)]
    kv_cache: Option<String>,
    /// Attention implementation: auto (the fastest for the device: fused on the CPU and
    /// CUDA, tiled on Metal), naive (the oracle; n² memory), tiled, or fused (the CUDA
    /// kernel on CUDA builds).
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Which attention to time: both (vanilla and SelfExtend, interleaved), vanilla or
    /// selfextend. Run one at a time to read the peak RSS of that one alone.
    #[arg(long, value_enum, default_value_t = Which::Both)]
    attention: Which,
    /// Before timing, run a short prefill and one decode step, untimed, per kind of
    /// attention. Always done off the CPU, where the first run would otherwise pay
    /// for loading kernels and creating library handles.
    #[arg(long)]
    warm_up: bool,
    /// Also measure this machine (f32 FMA peak, 8-bit multiply-add peak, memory read
    /// bandwidth; a few seconds, after the runs) and report each prefill's share of the
    /// fastest its FLOPs could run (quantized linear layers at the 8-bit peak,
    /// attention at the f32 one) and each decode's bytes/s (weights and KV cache read
    /// per token) as a share of the bandwidth.
    #[arg(long)]
    machine: bool,
    /// Instead of running the model, time one layer's causal attention over a whole
    /// prompt of each `--prefill` length, on the model's shapes: our fused kernel
    /// (plain and SelfExtend, RoPE inside) against candle's CPU flash attention
    /// (plain, inputs already rotated).
    #[arg(long)]
    attention_kernels: bool,
    /// Print JSON to stdout instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Both,
    Vanilla,
    Selfextend,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Layout {
    Auto,
    Together,
    Halves,
}

impl From<Layout> for BatchLayout {
    fn from(layout: Layout) -> Self {
        match layout {
            Layout::Auto => Self::Auto,
            Layout::Together => Self::Together,
            Layout::Halves => Self::Halves,
        }
    }
}

#[derive(Serialize)]
struct Measurement {
    phase: &'static str,
    attention: &'static str,
    context: usize,
    tokens: usize,
    median_seconds: f64,
    tokens_per_second: f64,
    seconds: Vec<f64>,
    /// Prefill: the model's FLOPs per token (linear layers and causal attention).
    /// Decode: the bytes it must read per token (weights and the KV cache).
    work_per_token: f64,
    /// The linear layers' part of `work_per_token`.
    linear_work_per_token: f64,
    /// With `--machine`: the fastest this work could run on this machine, over the time
    /// it took. Prefill: linear FLOPs at the 8-bit peak (quantized weights) or the FMA
    /// peak, attention FLOPs at the FMA peak. Decode: the bytes at the read bandwidth.
    share_of_machine: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    model: String,
    device: String,
    backend: String,
    dtype: String,
    kv_cache: String,
    threads: usize,
    group_size: usize,
    window: usize,
    chunk_size: usize,
    repeats: usize,
    batch: usize,
    batch_layout: Layout,
    measurements: Vec<Measurement>,
    /// KV-cache bytes allocated for the longest sequence run.
    kv_cache_bytes: usize,
    /// Resident memory once the model is loaded: weights and runtime.
    rss_after_load_bytes: Option<u64>,
    peak_rss_bytes: Option<u64>,
    /// CUDA only: device memory in use once the model is loaded, and the most seen
    /// at any sample during the run.
    gpu_memory_after_load_bytes: Option<u64>,
    peak_gpu_memory_bytes: Option<u64>,
    machine: Option<Machine>,
    /// `--attention-kernels` only.
    attention_kernels: Vec<kernels::KernelTime>,
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Device memory in use on `device` (`total - free`), or `None` off CUDA.
fn gpu_used_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        let (free, total) = dev.cuda_stream().context().mem_get_info().ok()?;
        return Some(total.saturating_sub(free) as u64);
    }
    let _ = device;
    None
}

fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

fn rss_bytes() -> Option<u64> {
    status_bytes("VmRSS:")
}

fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

struct Bench {
    model: Model,
    args: Args,
    ids: Vec<u32>,
    kv_cache_bytes: usize,
    peak_gpu_bytes: Option<u64>,
}

impl Bench {
    /// Times a prefill of `n` tokens and, when `n` is the decode context, the decode
    /// steps after it, which then reuse its cache. Returns `(prefill, decode)` seconds.
    fn prefill_then_decode(
        &mut self,
        n: usize,
        se: Option<SelfExtend>,
    ) -> BenchResult<(f64, Option<f64>)> {
        let params = self.model.attention_params(se);
        let steps = self.args.decode_tokens;
        let decode = n == self.args.decode_context && steps > 0;
        let new_cache = || self.model.new_cache(n + if decode { steps } else { 0 });
        let mut cache = new_cache();
        let device = self.model.device().clone();
        let mut peak_gpu = self.peak_gpu_bytes;
        let sample = &mut |_, _| {
            peak_gpu = peak_gpu.max(gpu_used_bytes(&device));
            Ok(())
        };
        let start = Instant::now();
        let chunk = self.args.chunk_size;
        self.model.forward_chunked(
            &self.ids[..n],
            &mut cache,
            &params,
            chunk,
            LogitsFor::Last,
            sample,
        )?;
        let prefill = start.elapsed().as_secs_f64();
        let decode = if decode && self.args.batch > 1 {
            // The other sequences' prefills are not timed.
            let mut caches = vec![cache];
            for _ in 1..self.args.batch {
                let mut c = new_cache();
                let ids = &self.ids[..n];
                self.model
                    .forward_chunked(ids, &mut c, &params, chunk, LogitsFor::Last, sample)?;
                caches.push(c);
            }
            let start = Instant::now();
            for &id in &self.ids[n..n + steps] {
                let ids = [id];
                let mut batch: Vec<SequenceStep<'_>> = caches
                    .iter_mut()
                    .map(|cache| SequenceStep {
                        ids: &ids,
                        cache,
                        params: &params,
                        logits_for: LogitsFor::Last,
                    })
                    .collect();
                self.model.decoder().forward_batch_with(
                    &mut batch,
                    self.args.batch_layout.into(),
                    &mut || Ok(()),
                )?;
            }
            cache = caches.swap_remove(0);
            Some(start.elapsed().as_secs_f64())
        } else if decode {
            let start = Instant::now();
            for &id in &self.ids[n..n + steps] {
                self.model.forward_chunked(
                    &[id],
                    &mut cache,
                    &params,
                    1,
                    LogitsFor::Last,
                    sample,
                )?;
            }
            Some(start.elapsed().as_secs_f64())
        } else {
            None
        };
        self.peak_gpu_bytes = peak_gpu;
        self.kv_cache_bytes = self.kv_cache_bytes.max(cache.allocated_bytes());
        Ok((prefill, decode))
    }

    /// FLOPs per token of a prefill of `n` tokens from an empty cache: two per weight of
    /// the linear layers, and four per (query, key, head dimension) for the scores and
    /// the weighted values of causal attention. SelfExtend's extra scores on the
    /// window's boundary are not counted: this is the model's work, not ours.
    /// Returns `(total, linear layers' part)`.
    fn prefill_flops_per_token(&self, n: usize) -> (f64, f64) {
        let cfg = self.model.config();
        let linear = 2.0 * self.model.decoder().linear_cost().weights as f64;
        let per_key = 4.0 * (cfg.num_attention_heads * cfg.head_dim) as f64;
        let keys: f64 = (0..n).map(|i| layer_keys(cfg, i + 1) as f64).sum::<f64>();
        (linear + per_key * keys / n.max(1) as f64, linear)
    }

    /// Bytes one decode step must read per token at `context`: the linear layers'
    /// weights (shared by a step's `--batch` sequences) and each sequence's keys and
    /// values, at the middle of the timed steps.
    /// Returns `(total, weights' part)`.
    fn decode_bytes_per_token(&self, context: usize) -> (f64, f64) {
        let cfg = self.model.config();
        let batch = self.args.batch as f64;
        let weights = self.model.decoder().linear_cost().bytes as f64;
        let kv_row = 2
            * cfg.num_key_value_heads
            * cfg.head_dim
            * self.model.kv_cache_dtype().size_in_bytes();
        let kv = layer_keys(cfg, context + self.args.decode_tokens / 2) * kv_row;
        (weights / batch + kv as f64, weights / batch)
    }

    /// One short untimed prefill and decode step per kind of attention, so that no
    /// timed run pays for what a GPU does once (loading and compiling kernels,
    /// creating library handles, growing the memory pool).
    fn warm_up(&self, modes: &[Option<SelfExtend>]) -> BenchResult<()> {
        let n = (2 * self.args.chunk_size).min(self.ids.len().saturating_sub(1));
        if n == 0 {
            return Ok(());
        }
        eprintln!("  warm-up: a {n}-token prefill and a decode step per attention, untimed");
        for &se in modes {
            let params = self.model.attention_params(se);
            let mut cache = self.model.new_cache(n + 1);
            let quiet = &mut |_, _| Ok(());
            let chunk = self.args.chunk_size;
            let model = &self.model;
            model.forward_chunked(
                &self.ids[..n],
                &mut cache,
                &params,
                chunk,
                LogitsFor::Last,
                quiet,
            )?;
            model.forward_chunked(
                &self.ids[n..=n],
                &mut cache,
                &params,
                1,
                LogitsFor::Last,
                quiet,
            )?;
        }
        Ok(())
    }

    /// Prefill at `context` (and decode after it, if it is the decode context), repeated.
    fn measure(&mut self, context: usize, se: Option<SelfExtend>) -> BenchResult<Vec<Measurement>> {
        let mut prefill = Vec::with_capacity(self.args.repeats);
        let mut decode = Vec::with_capacity(self.args.repeats);
        for _ in 0..self.args.repeats {
            let (p, d) = self.prefill_then_decode(context, se)?;
            prefill.push(p);
            decode.extend(d);
        }
        let attention = if se.is_some() {
            "selfextend"
        } else {
            "vanilla"
        };
        let mut out = vec![];
        for (phase, seconds, tokens) in [
            ("prefill", prefill, context),
            ("decode", decode, self.args.decode_tokens * self.args.batch),
        ] {
            if seconds.is_empty() {
                continue;
            }
            let median_seconds = median(&seconds);
            eprintln!("  {phase:<7} {attention:<10} context {context:>7}: {median_seconds:.3} s");
            let (work_per_token, linear_work_per_token) = match phase {
                "prefill" => self.prefill_flops_per_token(context),
                _ => self.decode_bytes_per_token(context),
            };
            out.push(Measurement {
                phase,
                attention,
                context,
                tokens,
                median_seconds,
                tokens_per_second: tokens as f64 / median_seconds,
                seconds,
                work_per_token,
                linear_work_per_token,
                share_of_machine: None,
            });
        }
        Ok(out)
    }
}

/// The keys a query sees with `keys` tokens of context (itself included), summed over
/// the layers: a sliding-window layer sees at most its window.
fn layer_keys(cfg: &Config, keys: usize) -> usize {
    cfg.layer_kinds
        .iter()
        .map(|&kind| {
            keys.min(
                cfg.attention_kinds[kind]
                    .sliding_window
                    .unwrap_or(usize::MAX),
            )
        })
        .sum()
}

fn run(args: Args) -> BenchResult<Report> {
    if args.repeats == 0 || args.chunk_size == 0 || args.batch == 0 {
        return Err("--repeats, --chunk-size and --batch must be >= 1".into());
    }
    let se = SelfExtend::new(args.group_size, args.window)?;
    let device: Device = parse_device(&args.device)?;
    let dtype = args.dtype.as_deref().map(parse_dtype).transpose()?;
    let backend = parse_attention(&args.backend)?;
    let mut model = Model::load(&args.model, &device, dtype)?;
    model.set_attention_backend(backend);
    model.set_kv_cache_dtype(
        args.kv_cache
            .as_deref()
            .map(parse_kv_cache_dtype)
            .transpose()?,
    );
    let rss_after_load_bytes = rss_bytes();
    let gpu_memory_after_load_bytes = gpu_used_bytes(&device);
    let longest = args
        .prefill
        .iter()
        .copied()
        .chain([args.decode_context + args.decode_tokens])
        .max()
        .unwrap_or(0);
    let vocab = model.config().vocab_size as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let ids = (0..longest).map(|_| rng.random_range(0..vocab)).collect();
    eprintln!(
        "benchmarking {} ({} layers, trained context {}), {} repeats",
        args.model.display(),
        model.config().num_hidden_layers,
        model.config().max_position_embeddings,
        args.repeats
    );
    let mut bench = Bench {
        model,
        args,
        ids,
        kv_cache_bytes: 0,
        peak_gpu_bytes: gpu_memory_after_load_bytes,
    };
    let modes = match bench.args.attention {
        Which::Both => vec![None, Some(se)],
        Which::Vanilla => vec![None],
        Which::Selfextend => vec![Some(se)],
    };
    let mut lengths = bench.args.prefill.clone();
    if bench.args.decode_context > 0 && !lengths.contains(&bench.args.decode_context) {
        lengths.push(bench.args.decode_context);
    }
    if bench.args.warm_up || !bench.model.device().is_cpu() {
        bench.warm_up(&modes)?;
    }
    let mut measurements = vec![];
    let mut attention_kernels = vec![];
    if bench.args.attention_kernels {
        kernels::check(&bench.model)?;
        let (prefill, repeats) = (&bench.args.prefill, bench.args.repeats);
        attention_kernels = kernels::compare(&bench.model, prefill, se, repeats)?;
        lengths.clear();
    }
    for &n in &lengths {
        for &mode in &modes {
            let timed = bench.measure(n, mode)?;
            // A decode context that is not a prefill length: its prefill is not reported.
            measurements.extend(
                timed
                    .into_iter()
                    .filter(|m| m.phase == "decode" || bench.args.prefill.contains(&n)),
            );
        }
    }
    // Tables pair vanilla with SelfExtend per (phase, context).
    measurements.sort_by_key(|m| (m.phase == "decode", m.context, m.attention == "selfextend"));
    // Read before the machine's own buffers count.
    let peak_rss_bytes = peak_rss_bytes();
    let machine = bench.args.machine.then(|| {
        eprintln!("measuring the machine: FMA peak and memory read bandwidth");
        machine::measure(rayon::current_num_threads())
    });
    if let Some(machine) = &machine {
        let linear_peak = match machine.int8_peak_ops {
            Some(ops) if bench.model.is_quantized() => ops,
            _ => machine.fma_peak_flops,
        };
        for m in &mut measurements {
            let fastest = match m.phase {
                "prefill" => {
                    m.linear_work_per_token / linear_peak
                        + (m.work_per_token - m.linear_work_per_token) / machine.fma_peak_flops
                }
                _ => m.work_per_token / machine.read_bytes_per_second,
            };
            m.share_of_machine = Some(m.tokens_per_second * fastest);
        }
    }
    let args = &bench.args;
    Ok(Report {
        model: args.model.display().to_string(),
        device: args.device.clone(),
        backend: bench.model.attention_backend().name().into(),
        dtype: match &args.dtype {
            Some(d) => d.clone(),
            None if bench.model.is_quantized() => "quantized (f32 compute)".into(),
            None => "f32".into(),
        },
        kv_cache: bench.model.kv_cache_dtype().as_str().into(),
        threads: rayon::current_num_threads(),
        group_size: args.group_size,
        window: args.window,
        chunk_size: args.chunk_size,
        repeats: args.repeats,
        batch: args.batch,
        batch_layout: args.batch_layout,
        measurements,
        kv_cache_bytes: bench.kv_cache_bytes,
        rss_after_load_bytes,
        peak_rss_bytes,
        gpu_memory_after_load_bytes,
        peak_gpu_memory_bytes: bench.peak_gpu_bytes,
        machine,
        attention_kernels,
    })
}

fn print_table(r: &Report) {
    println!(
        "SelfExtend G={} W={}, {} on {} ({} threads), {} attention, {} KV cache, chunk {}, \
         median of {}",
        r.group_size,
        r.window,
        r.dtype,
        r.device,
        r.threads,
        r.backend,
        r.kv_cache,
        r.chunk_size,
        r.repeats
    );
    if r.batch > 1 {
        println!(
            "decode: {} sequences per step, layout {:?}; tok/s counts all of them",
            r.batch, r.batch_layout
        );
    }
    if !r.attention_kernels.is_empty() {
        print_kernels(r);
    } else if r
        .measurements
        .iter()
        .any(|m| m.attention != r.measurements[0].attention)
    {
        print_pairs(r);
    } else {
        println!(
            "{:<8} {:>8} {:>11} {:>9}",
            "phase", "context", "attention", "tok/s"
        );
        for m in &r.measurements {
            println!(
                "{:<8} {:>8} {:>11} {:>9.1}",
                m.phase, m.context, m.attention, m.tokens_per_second
            );
        }
    }
    if let Some(m) = &r.machine {
        print_machine(r, m);
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "KV cache (largest run): {:.1} MiB",
        mib(r.kv_cache_bytes as u64)
    );
    if let (Some(load), Some(peak)) = (r.rss_after_load_bytes, r.peak_rss_bytes) {
        println!(
            "RSS after load: {:.1} MiB, peak RSS: {:.1} MiB",
            mib(load),
            mib(peak)
        );
    }
    if let (Some(load), Some(peak)) = (r.gpu_memory_after_load_bytes, r.peak_gpu_memory_bytes) {
        println!(
            "GPU memory in use after load: {:.1} MiB, peak: {:.1} MiB",
            mib(load),
            mib(peak)
        );
    }
}

fn print_kernels(r: &Report) {
    println!(
        "One layer's causal attention over the whole prompt (`--attention-kernels`)\n\
         {:<26} {:>8} {:>10} {:>10} {:>16}",
        "kernel", "length", "seconds", "tok/s", "candle / this"
    );
    for k in &r.attention_kernels {
        let candle = r
            .attention_kernels
            .iter()
            .find(|c| c.length == k.length && c.kernel.starts_with("candle"))
            .map_or(f64::NAN, |c| c.median_seconds);
        println!(
            "{:<26} {:>8} {:>10.4} {:>10.1} {:>16.2}",
            k.kernel,
            k.length,
            k.median_seconds,
            k.tokens_per_second,
            candle / k.median_seconds
        );
    }
}

fn print_machine(r: &Report, m: &Machine) {
    let int8 = match (m.int8_isa, m.int8_peak_ops) {
        (Some(isa), Some(ops)) => format!(", 8-bit ({isa}) {:.1} GOP/s", ops / 1e9),
        _ => String::new(),
    };
    println!(
        "Against the machine ({} threads): f32 FMA ({}) {:.1} GFLOP/s{int8}, memory read \
         {:.1} GB/s; share = the fastest the work could run here / the time it took",
        m.threads,
        m.isa,
        m.fma_peak_flops / 1e9,
        m.read_bytes_per_second / 1e9
    );
    println!(
        "{:<8} {:>8} {:>11} {:>9} {:>13} {:>14} {:>6}",
        "phase", "context", "attention", "tok/s", "work/token", "rate", "share"
    );
    for x in &r.measurements {
        let (work, rate) = match x.phase {
            "prefill" => (
                format!("{:.2} GFLOP", x.work_per_token / 1e9),
                format!(
                    "{:.1} GFLOP/s",
                    x.tokens_per_second * x.work_per_token / 1e9
                ),
            ),
            _ => (
                format!("{:.1} MB", x.work_per_token / 1e6),
                format!("{:.1} GB/s", x.tokens_per_second * x.work_per_token / 1e9),
            ),
        };
        let share = x.share_of_machine.unwrap_or(f64::NAN) * 100.0;
        println!(
            "{:<8} {:>8} {:>11} {:>9.1} {:>13} {:>14} {:>5.0}%",
            x.phase, x.context, x.attention, x.tokens_per_second, work, rate, share
        );
    }
}

fn print_pairs(r: &Report) {
    println!(
        "{:<8} {:>8} {:>14} {:>17} {:>18}",
        "phase", "context", "vanilla tok/s", "selfextend tok/s", "time ratio SE/van"
    );
    for pair in r.measurements.chunks(2) {
        let [van, ext] = pair else { continue };
        println!(
            "{:<8} {:>8} {:>14.1} {:>17.1} {:>18.3}",
            van.phase,
            van.context,
            van.tokens_per_second,
            ext.tokens_per_second,
            ext.median_seconds / van.median_seconds
        );
    }
}

fn main() -> std::process::ExitCode {
    selfextend_core::tune_thread_pools();
    let args = Args::parse();
    let json = args.json;
    match run(args) {
        Ok(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("serializable")
                );
            } else {
                print_table(&report);
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
