//! Newtypes that validate at the edge and are trusted inside.

use std::fmt;

/// A scope's name: 1–64 characters of lower-case letters, digits, `-`, `_` and `.`,
/// starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct ScopeName(String);

impl ScopeName {
    pub fn parse(text: &str) -> Result<Self, InvalidScopeName> {
        let valid_start = text.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let valid_rest =
            text.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
        if text.is_empty() || text.len() > 64 || !valid_start || !valid_rest {
            return Err(InvalidScopeName(text.escape_debug().to_string()));
        }
        Ok(Self(text.to_owned()))
    }

    /// A name read back from keybroker's own database: it was validated when it was written,
    /// and a record written under older rules must still be readable.
    pub fn stored(text: String) -> Self {
        Self(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ScopeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ScopeName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ScopeName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// A refused scope name (escaped, as it would be printed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a scope name (1-64 of a-z, 0-9, '-', '_', '.', starting with a letter or digit)")]
pub struct InvalidScopeName(String);

/// Why a purpose was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPurpose {
    #[error("purpose must not be empty")]
    Empty,
    #[error("purpose is {0} characters long; at most {PURPOSE_MAX_CHARS} are allowed")]
    TooLong(usize),
    /// Control and invisible formatting characters could hide text in Octopus's UI or in logs.
    #[error("purpose contains the non-printable character U+{0:04X}")]
    NonPrintable(u32),
}

/// Why a requested lifetime was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTtl {
    #[error("ttl: {0}")]
    Unreadable(#[from] crate::domain::duration::InvalidDuration),
    #[error("ttl: too long")]
    TooLong,
    #[error("ttl: must be at least one minute")]
    TooShort,
}

/// Why a key is wanted: 1–200 printable characters after trimming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purpose(String);

pub const PURPOSE_MAX_CHARS: usize = 200;

impl Purpose {
    pub fn parse(text: &str) -> Result<Self, InvalidPurpose> {
        let trimmed = text.trim();
        let count = trimmed.chars().count();
        if count == 0 {
            return Err(InvalidPurpose::Empty);
        }
        if count > PURPOSE_MAX_CHARS {
            return Err(InvalidPurpose::TooLong(count));
        }
        if let Some(bad) = trimmed.chars().find(|c| c.is_control() || is_invisible_format(*c)) {
            return Err(InvalidPurpose::NonPrintable(u32::from(bad)));
        }
        Ok(Self(trimmed.to_owned()))
    }

    /// A purpose read back from keybroker's own database: it was validated when it was
    /// written, and a record written under older rules must still be readable.
    pub fn stored(text: String) -> Self {
        Self(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Purpose {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for Purpose {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}')
}

/// A requested lifetime such as `"7d"`, `"12h"` or `"90m"`.
pub fn parse_ttl(text: &str) -> Result<chrono::Duration, InvalidTtl> {
    let std = crate::domain::duration::parse_duration(text)?;
    let ttl = chrono::Duration::from_std(std).map_err(|_| InvalidTtl::TooLong)?;
    if ttl < chrono::Duration::minutes(1) {
        return Err(InvalidTtl::TooShort);
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_names_are_lower_case_slugs() {
        assert!(ScopeName::parse("payments-deploy").is_ok());
        assert!(ScopeName::parse("a.b_c-1").is_ok());
        for bad in ["", "Payments", "-x", "a b", "x/y", &"a".repeat(65)] {
            assert!(ScopeName::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn purpose_is_trimmed() {
        assert_eq!(Purpose::parse("  deploy payments \n").unwrap().as_str(), "deploy payments");
    }

    #[test]
    fn purpose_length_is_counted_in_characters() {
        assert!(Purpose::parse(&"é".repeat(200)).is_ok());
        assert!(Purpose::parse(&"é".repeat(201)).is_err());
        assert!(Purpose::parse("   ").is_err());
    }

    #[test]
    fn purpose_with_control_characters_is_refused() {
        for bad in ["a\u{0}b", "line\nbreak", "tab\there", "bell\u{7}", "rtl\u{202E}x", "zw\u{200B}j"] {
            assert!(Purpose::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn ttl_accepts_human_durations() {
        assert_eq!(parse_ttl("7d").unwrap(), chrono::Duration::days(7));
        assert_eq!(parse_ttl("90m").unwrap(), chrono::Duration::minutes(90));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("soon").is_err());
        assert!(parse_ttl("").is_err());
    }
}
