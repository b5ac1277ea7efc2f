//! Chat prompts: a model's own Jinja chat template rendered over a conversation.

use std::collections::BTreeMap;

use minijinja::{context, Environment, Error as JinjaError, ErrorKind, Value};

use crate::error::{Error, Result};
use crate::model::ChatTemplate;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    fn to_value(&self) -> Value {
        Value::from(BTreeMap::from([
            ("role", Value::from(self.role.as_str())),
            ("content", Value::from(self.content.as_str())),
        ]))
    }

    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Renders `messages` with the template, as `transformers`' `apply_chat_template`
/// does: Python string methods are available, and `raise_exception(msg)` reports a
/// conversation the template rejects.
pub fn render(
    template: &ChatTemplate,
    messages: &[Message],
    add_generation_prompt: bool,
) -> Result<String> {
    if messages.is_empty() {
        return Err(Error::invalid("messages", "must hold at least one message"));
    }
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        },
    );
    let tmpl = env
        .template_from_str(&template.source)
        .map_err(|e| Error::Config {
            path: "chat template".into(),
            msg: format!("the chat template does not parse: {e}"),
        })?;
    tmpl.render(context! {
        messages => messages.iter().map(Message::to_value).collect::<Vec<_>>(),
        add_generation_prompt => add_generation_prompt,
        bos_token => template.bos_token.clone().unwrap_or_default(),
        eos_token => template.eos_token.clone().unwrap_or_default(),
    })
    .map_err(|e| {
        let detail = e
            .detail()
            .map(str::to_string)
            .unwrap_or_else(|| e.to_string());
        match e.kind() {
            // The template calls what our Jinja does not have: no conversation renders.
            ErrorKind::UnknownFunction
            | ErrorKind::UnknownFilter
            | ErrorKind::UnknownTest
            | ErrorKind::UnknownMethod => Error::Unsupported {
                path: "chat template".into(),
                msg: format!("the chat template uses what selfextend_rs cannot run: {e}"),
            },
            _ => Error::invalid(
                "messages",
                format!("the chat template rejected them: {detail}"),
            ),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chatml() -> ChatTemplate {
        ChatTemplate {
            source: "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'].strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into(),
            bos_token: None,
            eos_token: Some("<|im_end|>".into()),
        }
    }

    #[test]
    fn renders_chatml_with_python_methods() {
        let out = render(&chatml(), &[Message::new("user", " hi ")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn template_exceptions_become_argument_errors() {
        let err = render(&chatml(), &[Message::new("bad", "x")], true).unwrap_err();
        assert!(err.to_string().contains("no bad roles"), "{err}");
        assert!(render(&chatml(), &[], true).is_err());
    }

    #[test]
    fn a_template_beyond_our_jinja_is_the_model_s_fault_not_the_caller_s() {
        let template = ChatTemplate {
            source: "{{ messages | no_such_filter }}".into(),
            ..chatml()
        };
        let err = render(&template, &[Message::new("user", "hi")], true).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("no_such_filter"), "{err}");
    }
}
