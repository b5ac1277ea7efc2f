//! A thin wrapper over `tokenizers::Tokenizer` that speaks our error type and adds
//! incremental decoding for streaming.

use std::path::Path;

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
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
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| tok_err(format!("loading {}", path.display()), e))?;
        Ok(Self { inner })
    }

    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Self { inner }
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
    tokenizer: tokenizers::Tokenizer,
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
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix)
        {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }
}
