//! A thin wrapper over `tokenizers::Tokenizer` that speaks our error type and adds
//! incremental decoding for streaming.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Tokenizer {
    // Shared, not copied: every stream decoder holds it (a copy of a 49k-token
    // vocabulary's tables cost milliseconds per request).
    inner: Arc<tokenizers::Tokenizer>,
}

fn tok_err(context: impl Into<String>, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        context: context.into(),
        msg: e.to_string(),
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"),
            ));
        }
        let context = format!("loading {}", path.display());
        // `tokenizers` 0.22 unwraps inside some of its deserializers (a decoder object
        // with a control character in a key panics); fuzzing found it, so malformed
        // files must not reach the caller as a panic.
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_file(path));
        let inner = match parsed {
            Ok(result) => result.map_err(|e| tok_err(context, e))?,
            Err(panic) => {
                let what = crate::error::panic_message(panic.as_ref());
                return Err(Error::Tokenizer {
                    context,
                    msg: format!("invalid tokenizer.json: {what}"),
                });
            }
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| tok_err("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err("decode", e))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// A decoder that turns ids into text one id at a time, emitting only complete
    /// UTF-8 characters.
    pub fn stream_decoder(&self, skip_special_tokens: bool) -> StreamDecoder {
        StreamDecoder {
            tokenizer: self.inner.clone(),
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }
}

/// Incremental detokenisation: decoding a growing id list and emitting the new suffix
/// once it no longer ends in a partial character. Decoding a short window of previous
/// ids (rather than each id alone) keeps tokenizer-level spacing rules intact.
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    tokenizer: Arc<tokenizers::Tokenizer>,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl StreamDecoder {
    /// Adds one id; returns text that became final, possibly empty.
    pub fn step(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let decode = |ids: &[u32]| {
            self.tokenizer
                .decode(ids, self.skip_special_tokens)
                .map_err(|e| tok_err("stream decode", e))
        };
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }
}

/// Building a `tokenizers::Tokenizer` from GGUF `tokenizer.ggml.*` metadata.
pub mod gguf {
    use std::collections::{BTreeMap, HashMap};
    use std::path::Path;

    use tokenizers::decoders::byte_fallback::ByteFallback;
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::decoders::sequence::Sequence as DecoderSequence;
    use tokenizers::decoders::strip::Strip;
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::normalizers::{Prepend, Replace};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

    use super::Tokenizer;
    use crate::error::{Error, Result};
    use crate::loader::gguf::Value;

    const TOKEN_CONTROL: i64 = 3;
    const TOKEN_USER_DEFINED: i64 = 4;

    /// The Llama 3 ("llama-bpe") pre-tokenizer split.
    const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    /// GPT-4o's (o200k) split ("gpt-4o"): case-aware letter runs with the contraction
    /// as a suffix, digits in threes, and a `/` absorbed after punctuation.
    const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    /// Qwen2's split ("qwen2" and its derivatives): Llama 3's with one digit per piece.
    const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    struct Meta<'a> {
        map: &'a BTreeMap<String, Value>,
        path: &'a Path,
    }

    impl Meta<'_> {
        fn err(&self, msg: String) -> Error {
            Error::Tokenizer {
                context: format!("building the tokenizer from {}", self.path.display()),
                msg,
            }
        }

        fn strings(&self, key: &str) -> Result<Vec<&str>> {
            let arr = self
                .map
                .get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| self.err(format!("missing array '{key}'")))?;
            arr.iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| self.err(format!("'{key}' must hold strings")))
                })
                .collect()
        }

        fn numbers<T>(&self, key: &str, f: impl Fn(&Value) -> Option<T>) -> Result<Option<Vec<T>>> {
            let Some(v) = self.map.get(key) else {
                return Ok(None);
            };
            let arr = v
                .as_array()
                .ok_or_else(|| self.err(format!("'{key}' must be an array")))?;
            arr.iter()
                .map(|v| f(v).ok_or_else(|| self.err(format!("'{key}' must hold numbers"))))
                .collect::<Result<Vec<_>>>()
                .map(Some)
        }

        fn token(&self, key: &str, tokens: &[&str]) -> Option<String> {
            let id = self.map.get(key)?.as_u64()? as usize;
            tokens.get(id).map(|t| t.to_string())
        }

        fn flag(&self, key: &str) -> Option<bool> {
            self.map.get(key).and_then(Value::as_bool)
        }
    }

    /// Builds the tokenizer llama.cpp would use for this file.
    pub fn from_metadata(map: &BTreeMap<String, Value>, path: &Path) -> Result<Tokenizer> {
        let meta = Meta { map, path };
        let model = map
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .ok_or_else(|| meta.err("missing 'tokenizer.ggml.model'".into()))?;
        let tokens = meta.strings("tokenizer.ggml.tokens")?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let types = meta
            .numbers("tokenizer.ggml.token_type", Value::as_i64)?
            .unwrap_or_default();
        if !types.is_empty() && types.len() != tokens.len() {
            return Err(meta.err(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let (mut tok, add_bos_default) = match model {
            "gpt2" => (gpt2(&meta, vocab)?, false),
            "llama" => (sentencepiece(&meta, vocab, &tokens)?, true),
            other => {
                return Err(meta.err(format!(
                    "tokenizer model '{other}' is not supported (expected 'gpt2' or 'llama')"
                )))
            }
        };
        let added: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
            .map(|(i, &t)| AddedToken::from(tokens[i], t == TOKEN_CONTROL).normalized(false))
            .collect();
        tok.add_special_tokens(added)
            .map_err(|e| meta.err(e.to_string()))?;

        let bos = meta.token("tokenizer.ggml.bos_token_id", &tokens);
        let eos = meta.token("tokenizer.ggml.eos_token_id", &tokens);
        let add_bos = meta
            .flag("tokenizer.ggml.add_bos_token")
            .unwrap_or(add_bos_default);
        let add_eos = meta.flag("tokenizer.ggml.add_eos_token").unwrap_or(false);
        let mut template = vec![];
        let mut specials = vec![];
        for (add, token) in [(add_bos, &bos), (add_eos, &eos)] {
            if let (true, Some(t)) = (add, token) {
                specials.push((
                    t.clone(),
                    tokens.iter().position(|x| x == t).unwrap() as u32,
                ));
            }
        }
        if add_bos {
            if let Some(b) = &bos {
                template.push(b.clone());
            }
        }
        template.push("$A".to_string());
        if add_eos {
            if let Some(e) = &eos {
                template.push(e.clone());
            }
        }
        if !specials.is_empty() {
            let processor = TemplateProcessing::builder()
                .try_single(template.join(" "))
                .map_err(|e| meta.err(e.to_string()))?
                .special_tokens(specials)
                .build()
                .map_err(|e| meta.err(e.to_string()))?;
            tok.with_post_processor(Some(processor));
        }
        Ok(Tokenizer::from_inner(tok))
    }

    fn gpt2(meta: &Meta, vocab: Vocab) -> Result<tokenizers::Tokenizer> {
        let merges = meta
            .strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| meta.err(format!("merge '{m}' is not two tokens")))
            })
            .collect::<Result<Vec<_>>>()?;
        for (a, b) in &merges {
            if !vocab.contains_key(a) || !vocab.contains_key(b) {
                return Err(meta.err(format!(
                    "merge '{a} {b}' uses a token not in the vocabulary"
                )));
            }
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| meta.err(e.to_string()))?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        let pre = meta
            .map
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "default" | "gpt2" | "gpt-2" => byte_level.into(),
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            "llama-bpe" | "llama3" | "llama-v3" | "qwen2" | "deepseek-r1-qwen" | "gpt-4o" => {
                let regex = match pre {
                    "qwen2" | "deepseek-r1-qwen" => QWEN2_SPLIT,
                    "gpt-4o" => GPT4O_SPLIT,
                    _ => LLAMA3_SPLIT,
                };
                let split = Split::new(
                    SplitPattern::Regex(regex.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| meta.err(e.to_string()))?;
                Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ])
                .into()
            }
            other => {
                return Err(meta.err(format!(
                    "pre-tokenizer '{other}' is not supported (supported: default, gpt2, smollm, \
                     llama-bpe, qwen2, deepseek-r1-qwen, gpt-4o)"
                )))
            }
        };
        tok.with_pre_tokenizer(Some(pre_tokenizer));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        Ok(tok)
    }

    /// A byte trie over vocabulary pieces.
    struct Trie {
        next: HashMap<(u32, u8), u32>,
        /// The id of the piece ending at each node.
        ends: Vec<Option<u32>>,
    }

    impl Trie {
        fn new<B: Iterator<Item = u8>>(pieces: impl Iterator<Item = (B, u32)>) -> Self {
            let mut trie = Self {
                next: HashMap::new(),
                ends: vec![None],
            };
            for (bytes, id) in pieces {
                let mut node = 0;
                for b in bytes {
                    let fresh = trie.ends.len() as u32;
                    node = *trie.next.entry((node, b)).or_insert(fresh);
                    if node == fresh {
                        trie.ends.push(None);
                    }
                }
                trie.ends[node as usize] = Some(id);
            }
            trie
        }

        /// `(length, id)` of every non-empty piece that `bytes` starts with.
        fn matches<'a>(
            &'a self,
            bytes: impl Iterator<Item = u8> + 'a,
        ) -> impl Iterator<Item = (usize, u32)> + 'a {
            bytes
                .scan(0u32, |node, b| {
                    *node = *self.next.get(&(*node, b))?;
                    Some(self.ends[*node as usize])
                })
                .enumerate()
                .filter_map(|(i, id)| Some((i + 1, id?)))
        }
    }

    /// A piece splits in few places, so real vocabularies' merges take some bytes per
    /// piece; one of ever longer runs of a byte splits everywhere, terabytes.
    const MAX_MERGE_BYTES: usize = 1 << 30;

    /// The merges of a SentencePiece vocabulary: every split of a piece into two pieces,
    /// the higher-scoring piece's first. `None` past `max_bytes` of merged text.
    pub(super) fn merges_from_scores(
        vocab: &Vocab,
        tokens: &[&str],
        scores: &[f64],
        max_bytes: usize,
    ) -> Option<Vec<(String, String)>> {
        // Every split of a piece into two vocabulary pieces is a merge. Tries find them
        // in time linear in the piece: hashing each prefix and suffix instead is
        // quadratic, hours for a (hostile) GGUF piece of a few megabytes.
        let heads = Trie::new(vocab.iter().map(|(t, &id)| (t.bytes(), id)));
        let tails = Trie::new(vocab.iter().map(|(t, &id)| (t.bytes().rev(), id)));
        let mut merges: Vec<(f64, u32, u32, String, String)> = vec![];
        let mut tail_at: Vec<Option<u32>> = vec![];
        let mut bytes = 0usize;
        for (piece, &score) in tokens.iter().zip(scores) {
            let n = piece.len();
            tail_at.clear();
            tail_at.resize(n + 1, None);
            for (len, id) in tails.matches(piece.bytes().rev()) {
                tail_at[n - len] = Some(id);
            }
            for (split, li) in heads.matches(piece.bytes()) {
                if let (true, Some(ri)) = (split < n, tail_at[split]) {
                    bytes += n;
                    if bytes > max_bytes {
                        return None;
                    }
                    let (l, r) = piece.split_at(split);
                    merges.push((score, li, ri, l.to_string(), r.to_string()));
                }
            }
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        Some(merges.into_iter().map(|(_, _, _, l, r)| (l, r)).collect())
    }

    /// SentencePiece-style BPE, as `transformers` converts Llama 1/2 tokenizers:
    /// merges derived from the piece scores, byte fallback, and "▁" for spaces.
    fn sentencepiece(meta: &Meta, vocab: Vocab, tokens: &[&str]) -> Result<tokenizers::Tokenizer> {
        let scores = meta
            .numbers("tokenizer.ggml.scores", Value::as_f64)?
            .ok_or_else(|| meta.err("missing 'tokenizer.ggml.scores'".into()))?;
        if scores.len() != tokens.len() {
            return Err(meta.err(format!(
                "{} scores for {} tokens",
                scores.len(),
                tokens.len()
            )));
        }
        let merges =
            merges_from_scores(&vocab, tokens, &scores, MAX_MERGE_BYTES).ok_or_else(|| {
                meta.err(format!(
                    "the pieces' merges would take more than {} MiB: not a vocabulary this \
                 loader can build",
                    MAX_MERGE_BYTES >> 20
                ))
            })?;
        let unk = meta
            .token("tokenizer.ggml.unknown_token_id", tokens)
            .unwrap_or_else(|| "<unk>".into());
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(unk)
            .byte_fallback(true)
            .fuse_unk(true)
            .build()
            .map_err(|e| meta.err(e.to_string()))?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        let mut normalizers: Vec<NormalizerWrapper> = vec![];
        let space_prefix = meta.flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
        if space_prefix {
            normalizers.push(Prepend::new("▁".into()).into());
        }
        normalizers.push(
            Replace::new(" ", "▁")
                .map_err(|e| meta.err(e.to_string()))?
                .into(),
        );
        tok.with_normalizer(Some(tokenizers::normalizers::Sequence::new(normalizers)))
            .map_err(|e| meta.err(e.to_string()))?;
        let mut decoders = vec![
            tokenizers::decoders::DecoderWrapper::Replace(
                Replace::new("▁", " ").map_err(|e| meta.err(e.to_string()))?,
            ),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if space_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        tok.with_decoder(Some(DecoderSequence::new(decoders)));
        Ok(tok)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::path::Path;

    use crate::loader::gguf::Value;

    fn meta(model: &str, tokens: &[&str], extra: Vec<(&str, Value)>) -> BTreeMap<String, Value> {
        let mut m = BTreeMap::new();
        m.insert("tokenizer.ggml.model".into(), Value::String(model.into()));
        m.insert(
            "tokenizer.ggml.tokens".into(),
            Value::Array(
                tokens
                    .iter()
                    .map(|t| Value::String(t.to_string()))
                    .collect(),
            ),
        );
        for (k, v) in extra {
            m.insert(k.into(), v);
        }
        m
    }

    #[test]
    fn sentencepiece_bpe_from_scores() {
        let tokens = ["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "ab", "▁ab"];
        // Higher score merges first: "▁ab" (from "▁a" + "b") beats everything.
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -0.5, -0.6, -0.1];
        let types = [2, 3, 3, 1, 1, 1, 1, 1, 1];
        let m = meta(
            "llama",
            &tokens,
            vec![
                (
                    "tokenizer.ggml.scores",
                    Value::Array(scores.iter().map(|&s| Value::F32(s)).collect()),
                ),
                (
                    "tokenizer.ggml.token_type",
                    Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
                ),
                ("tokenizer.ggml.bos_token_id", Value::U32(1)),
                ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ],
        );
        let tok = super::gguf::from_metadata(&m, Path::new("t.gguf")).unwrap();
        assert_eq!(tok.encode("ab ab", false).unwrap(), [8, 8]);
        assert_eq!(tok.encode("ab", true).unwrap(), [1, 8]);
        assert_eq!(tok.encode("ba", false).unwrap(), [3, 5, 4]);
        assert_eq!(tok.decode(&[1, 8, 8], true).unwrap(), "ab ab");
    }

    /// Every split both of whose halves are pieces, found by hashing each half.
    fn merges_by_lookup(tokens: &[&str], scores: &[f64]) -> Vec<(String, String)> {
        let vocab: HashMap<&str, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| (t, i as u32))
            .collect();
        let mut merges = vec![];
        for (piece, &score) in tokens.iter().zip(scores) {
            for (split, _) in piece.char_indices().skip(1) {
                let (l, r) = piece.split_at(split);
                if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                    merges.push((score, li, ri, l.to_string(), r.to_string()));
                }
            }
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        merges.into_iter().map(|(_, _, _, l, r)| (l, r)).collect()
    }

    fn merges(tokens: &[&str], scores: &[f64]) -> Vec<(String, String)> {
        let vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| (t.to_string(), i as u32))
            .collect();
        super::gguf::merges_from_scores(&vocab, tokens, scores, usize::MAX).unwrap()
    }

    #[test]
    fn merges_are_every_split_into_two_pieces() {
        // Vocabularies of short strings over an alphabet with multi-byte characters, so
        // that byte positions inside a character are exercised too.
        let alphabet = ["a", "b", "▁", "é"];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for _ in 0..50 {
            let mut pieces: Vec<String> = alphabet.iter().map(|s| s.to_string()).collect();
            for _ in 0..40 {
                let len = 2 + next(5);
                pieces.push((0..len).map(|_| alphabet[next(4) as usize]).collect());
            }
            pieces.sort();
            pieces.dedup();
            let tokens: Vec<&str> = pieces.iter().map(String::as_str).collect();
            let scores: Vec<f64> = tokens.iter().map(|_| -(next(8) as f64)).collect();
            let found = merges(&tokens, &scores);
            assert!(!found.is_empty());
            assert_eq!(found, merges_by_lookup(&tokens, &scores));
        }
    }

    #[test]
    fn a_huge_piece_costs_its_length() {
        // A 256 KiB piece: hashing every prefix and suffix would hash 7 * 10^10 bytes.
        let huge = "a".repeat(1 << 18);
        let rest = "a".repeat((1 << 18) - 1);
        let tokens = ["a", &rest, &huge];
        let found = merges(&tokens, &[0.0, -1.0, -2.0]);
        assert_eq!(found.len(), 2);
        assert!(found.iter().all(|(l, r)| l.len() + r.len() == 1 << 18));
    }

    #[test]
    fn merges_past_the_limit_are_refused() {
        // Runs of "a" of every length up to 200 split at every position: 2.7 MB of
        // merged text from a vocabulary of 20 kB.
        let runs: Vec<String> = (1..=200).map(|n| "a".repeat(n)).collect();
        let tokens: Vec<&str> = runs.iter().map(String::as_str).collect();
        let scores = vec![0.0; tokens.len()];
        let vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| (t.to_string(), i as u32))
            .collect();
        let merges = |limit| super::gguf::merges_from_scores(&vocab, &tokens, &scores, limit);
        assert!(merges(1 << 20).is_none());
        assert_eq!(merges(4 << 20).unwrap().len(), 199 * 200 / 2);
    }

    #[test]
    fn gemma_sentencepiece_adds_no_space_prefix() {
        // Gemma and Gemma 2/3 GGUFs set `add_space_prefix` false: "ab ab" starts with
        // "ab", not "▁ab", and decoding strips no leading space.
        let tokens = ["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "ab", "▁ab"];
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -0.5, -0.6, -0.1];
        let m = meta(
            "llama",
            &tokens,
            vec![
                (
                    "tokenizer.ggml.scores",
                    Value::Array(scores.iter().map(|&s| Value::F32(s)).collect()),
                ),
                ("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
                ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ],
        );
        let tok = super::gguf::from_metadata(&m, Path::new("t.gguf")).unwrap();
        assert_eq!(tok.encode("ab ab", false).unwrap(), [7, 8]);
        assert_eq!(tok.encode("ab", true).unwrap(), [1, 7]);
        assert_eq!(tok.decode(&[8, 7], true).unwrap(), " abab");
    }

    #[test]
    fn unsupported_tokenizers_are_named() {
        let m = meta("bert", &["a"], vec![]);
        let err = super::gguf::from_metadata(&m, Path::new("t.gguf")).unwrap_err();
        assert!(err.to_string().contains("'bert'"), "{err}");
        let m = meta(
            "gpt2",
            &["a"],
            vec![
                ("tokenizer.ggml.merges", Value::Array(vec![])),
                ("tokenizer.ggml.pre", Value::String("tekken".into())),
            ],
        );
        let err = super::gguf::from_metadata(&m, Path::new("t.gguf")).unwrap_err();
        assert!(err.to_string().contains("'tekken'"), "{err}");
    }
}
