//! Durations written the human way: `"30s"`, `"15m"`, `"7d"` (the config file, `ttl`).

use std::time::Duration;

/// Parses `"30s"`, `"15m"`, `"12h"`, `"7d"`, `"2w"` and combinations such as `"1d 12h"`.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(keybroker::domain::duration::parse_duration("1d 12h"), Ok(Duration::from_secs(36 * 3600)));
/// assert!(keybroker::domain::duration::parse_duration("soon").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, InvalidDuration> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(InvalidDuration::Missing);
    }
    humantime::parse_duration(trimmed)
        .map_err(|e| InvalidDuration::Unreadable { text: trimmed.to_owned(), reason: e.to_string() })
}

/// Why a duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDuration {
    #[error("a duration is required, such as \"30s\", \"15m\" or \"7d\"")]
    Missing,
    #[error("`{text}` is not a duration ({reason}); write e.g. \"30s\", \"15m\" or \"7d\"")]
    Unreadable { text: String, reason: String },
}
