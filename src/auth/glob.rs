//! Globs for bindings and pinned subjects: `*` matches any run of characters (`/` and `:`
//! included, as in Vault's `bound_claims_type = "glob"` and Octopus's subject wildcards), `?`
//! exactly one character, anything else itself. No character classes, no escapes: claim values
//! such as `repo:acme/payments:ref:refs/heads/main` need none.

/// Whether `text` matches `pattern` as a whole.
///
/// ```
/// use keybroker::auth::glob::matches;
/// assert!(matches("repo:acme/*:ref:refs/heads/main", "repo:acme/payments:ref:refs/heads/main"));
/// assert!(!matches("repo:acme/*", "repo:evil/acme/x"));
/// ```
pub fn matches(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // The classic linear-time wildcard walk: remember the last `*` and where it started
    // matching, and on a mismatch let that `*` swallow one more character.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((star_pi, star_ti)) => {
                    pi = star_pi + 1;
                    ti = star_ti + 1;
                    star = Some((star_pi, star_ti + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn a_literal_matches_only_itself() {
        assert!(matches("refs/heads/main", "refs/heads/main"));
        assert!(!matches("refs/heads/main", "refs/heads/main2"));
        assert!(!matches("refs/heads/main", "refs/heads/mai"));
        assert!(matches("", ""));
        assert!(!matches("", "x"));
    }

    #[test]
    fn star_matches_any_run_across_slashes_and_colons() {
        assert!(matches("*", ""));
        assert!(matches("*", "anything/at:all"));
        assert!(matches("repo:acme/*", "repo:acme/payments:ref:refs/heads/main"));
        assert!(matches("repo:acme/*:environment:production", "repo:acme/payments:environment:production"));
        assert!(!matches("repo:acme/*:environment:production", "repo:acme/payments:environment:staging"));
        assert!(matches("system:serviceaccount:payments:*", "system:serviceaccount:payments:deployer"));
        assert!(!matches("system:serviceaccount:payments:*", "system:serviceaccount:payments-evil"));
        assert!(matches("a*b*c", "a-b-b-c"));
        assert!(matches("**", "x"));
        assert!(!matches("a*b", "a-c"));
    }

    #[test]
    fn question_mark_matches_exactly_one_character() {
        assert!(matches("v?", "v1"));
        assert!(!matches("v?", "v"));
        assert!(!matches("v?", "v10"));
        assert!(matches("?*", "é"));
        assert!(!matches("?*", ""));
    }

    #[test]
    fn matching_is_anchored_at_both_ends_and_case_sensitive() {
        assert!(!matches("acme", "xacme"));
        assert!(!matches("acme", "acmex"));
        assert!(!matches("Acme/*", "acme/x"));
    }
}
