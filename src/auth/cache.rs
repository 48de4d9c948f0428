//! Tokens verified in the last minute, so that a caller sending the same token again is not
//! verified again (Envoy's `jwt_authn` keeps such a cache too). A token's signature, claims and
//! principal do not change, so the answer cannot either, within two bounds: the token's own
//! `exp` (with the leeway verification allows), and [`MAX_AGE`]. A key taken out of an issuer's
//! set (which keybroker notices at its next JWKS fetch, within `jwks::MAX_AGE`, an hour) still
//! admits the tokens it verified in the minute before, for the rest of that minute at most.
//!
//! Entries are found by the SHA-256 of the token, never by the token: nothing compares a
//! caller's text with a stored token, and the cache holds no credential. Only tokens that
//! passed every check are kept; refusals are verified each time, within the per-address budget.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::domain::principal::Principal;

/// How long a verified token is taken on trust at most.
pub const MAX_AGE: Duration = Duration::from_secs(60);
/// How many tokens are kept; when full, the expired ones go, and if none has, all of them.
const CAPACITY: usize = 2048;

type TokenDigest = [u8; 32];

#[derive(Default)]
pub struct VerifiedTokens {
    entries: RwLock<HashMap<TokenDigest, Entry>>,
}

struct Entry {
    principal: Principal,
    /// The token's `exp` with the leeway, in Unix seconds, as the verification read it.
    until: u64,
    /// When it was verified, on the monotonic clock, so that a wall clock set back cannot
    /// stretch [`MAX_AGE`].
    verified: Instant,
}

impl Entry {
    fn usable_at(&self, now: u64, at: Instant) -> bool {
        now < self.until && at.saturating_duration_since(self.verified) < MAX_AGE
    }
}

impl VerifiedTokens {
    /// The principal of `token` if it was verified and may still be used at `now` (Unix
    /// seconds).
    pub fn get(&self, token: &str, now: u64) -> Option<Principal> {
        self.get_at(token, now, Instant::now())
    }

    fn get_at(&self, token: &str, now: u64, at: Instant) -> Option<Principal> {
        let digest = digest(token);
        let entries = self.entries.read().ok()?;
        let entry = entries.get(&digest).filter(|e| e.usable_at(now, at))?;
        Some(entry.principal.clone())
    }

    /// Keeps `principal` for `token`, verified at `now` (Unix seconds), until `usable_until` (the
    /// token's `exp` with the leeway) or for [`MAX_AGE`], whichever comes first.
    pub fn insert(&self, token: &str, principal: &Principal, now: u64, usable_until: u64) {
        self.insert_at(token, principal, now, usable_until, Instant::now());
    }

    fn insert_at(&self, token: &str, principal: &Principal, now: u64, usable_until: u64, at: Instant) {
        if usable_until <= now {
            return;
        }
        let Ok(mut entries) = self.entries.write() else { return };
        if entries.len() >= CAPACITY {
            entries.retain(|_, e| e.usable_at(now, at));
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(digest(token), Entry { principal: principal.clone(), until: usable_until, verified: at });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.read().map(|e| e.len()).unwrap_or_default()
    }
}

fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::domain::principal::Role;

    fn principal(subject: &str) -> Principal {
        Principal {
            subject: subject.to_owned(),
            issuer: "default".to_owned(),
            display_name: subject.to_owned(),
            teams: BTreeSet::from(["payments".to_owned()]),
            roles: BTreeSet::from([Role::Requester]),
        }
    }

    #[test]
    fn a_token_is_trusted_until_its_expiry_or_a_minute_whichever_is_first() {
        let cache = VerifiedTokens::default();
        let t0 = Instant::now();
        cache.insert_at("token-a", &principal("a"), 1_000, 1_010, t0);
        assert_eq!(cache.get_at("token-a", 1_009, t0).map(|p| p.subject), Some("a".to_owned()));
        assert_eq!(cache.get_at("token-a", 1_010, t0), None, "expired");
        cache.insert_at("token-b", &principal("b"), 1_000, 1_000_000, t0);
        assert!(cache.get_at("token-b", 1_059, t0 + Duration::from_secs(59)).is_some());
        assert_eq!(cache.get_at("token-b", 1_060, t0 + MAX_AGE), None, "older than MAX_AGE");
        // A wall clock set back does not stretch the minute.
        assert_eq!(cache.get_at("token-b", 900, t0 + MAX_AGE), None);
        // Another text, even one character off, is not the token that was verified.
        assert_eq!(cache.get_at("token-c", 1_001, t0), None);
        assert_eq!(cache.get_at("token-a ", 1_001, t0), None);
        // A token already expired is not kept.
        cache.insert_at("token-d", &principal("d"), 1_000, 1_000, t0);
        assert_eq!(cache.get_at("token-d", 999, t0), None);
    }

    #[test]
    fn the_cache_stays_within_its_capacity() {
        let cache = VerifiedTokens::default();
        let t0 = Instant::now();
        for i in 0..CAPACITY {
            cache.insert_at(&format!("old-{i}"), &principal("o"), 1_000, 1_010, t0);
        }
        // Full: the expired entries make room.
        cache.insert_at("new", &principal("n"), 1_020, 1_080, t0);
        assert_eq!(cache.len(), 1);
        for i in 0..CAPACITY + 10 {
            cache.insert_at(&format!("live-{i}"), &principal("l"), 1_020, 1_080, t0);
        }
        assert!(cache.len() <= CAPACITY);
    }
}
