//! Logging: JSON lines in production, readable text in dev. `RUST_LOG` filters as usual.

use tracing_subscriber::EnvFilter;

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
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        // Each span's fields once, in `spans` (outermost first): the current span again in `span`
        // would cost every line a second parse and copy of them.
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_span_list(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}
