//! Durations written the human way: `"30s"`, `"15m"`, `"7d"` (the config file, `ttl`).

use std::time::Duration;

/// Parses `"30s"`, `"15m"`, `"12h"`, `"7d"`, `"2w"` and combinations such as `"1d 12h"`.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(keybroker::domain::duration::parse_duration("1d 12h"), Ok(Duration::from_secs(36 * 3600)));
/// assert!(keybroker::domain::duration::parse_duration("soon").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("a duration is required, such as \"30s\", \"15m\" or \"7d\"".to_owned());
    }
    humantime::parse_duration(trimmed)
        .map_err(|e| format!("`{trimmed}` is not a duration ({e}); write e.g. \"30s\", \"15m\" or \"7d\""))
}
