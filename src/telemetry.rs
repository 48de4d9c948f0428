//! Logging: JSON lines in production, readable text in dev. `RUST_LOG` filters as usual.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

impl LogFormat {
    /// `KEYBROKER_LOG_FORMAT=json|pretty`, else the command's default.
    pub fn from_env(default: Self) -> Self {
        match std::env::var("KEYBROKER_LOG_FORMAT").ok().as_deref() {
            Some("json") => Self::Json,
            Some("pretty" | "text") => Self::Pretty,
            _ => default,
        }
    }
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=warn,hyper=warn"));
    // A second init (tests, `dev` after `serve`'s set-up) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => json_lines(filter, std::io::stderr).try_init().map_err(|e| e.to_string()),
        LogFormat::Pretty => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .compact()
            .try_init()
            .map_err(|e| e.to_string()),
    };
}

/// The JSON-lines subscriber. Each span's fields appear once, in `spans` (outermost first): the
/// current span again in `span` would cost every line a second parse and copy of them.
fn json_lines<W>(filter: EnvFilter, writer: W) -> impl tracing::Subscriber + Send + Sync + 'static
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(true)
        .finish()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_json_line_has_its_message_and_fields_at_the_top_and_its_spans_once() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = json_lines(EnvFilter::new("info"), move || writer.clone());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(target: "keybroker::api", "request", route = "/v1/me", request_id = "r-1");
            span.in_scope(|| tracing::info!(target: "keybroker::api", status = 200, "handled"));
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["message"], "handled", "{line}");
        assert_eq!(line["status"], 200);
        assert_eq!(line["target"], "keybroker::api");
        assert_eq!(line["spans"][0]["name"], "request");
        assert_eq!(line["spans"][0]["request_id"], "r-1");
        assert!(line.get("span").is_none(), "the current span is not repeated: {line}");
    }
}
