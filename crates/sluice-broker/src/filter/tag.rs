//! Tag filters: `*` or `TagA||TagB||TagC`.
//!
//! The expression is trimmed; `*` or an empty expression selects every
//! message. Otherwise it is split on `||`, each part is trimmed and empty parts
//! are dropped. If nothing is left, or one of the parts is `*`, every message
//! is selected. Tags are compared exactly (case-sensitive), and a message
//! without a tag only passes the select-everything filter.

use super::Filter;

/// A non-empty set of tags a subscription accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagSet {
    /// Distinct tags in the order they first appeared in the expression.
    tags: Vec<Box<str>>,
}

impl TagSet {
    /// The accepted tags, distinct, in expression order. Callers can use them
    /// to pre-filter on stored tag hashes before calling
    /// [`Filter::matches`].
    pub fn tags(&self) -> impl Iterator<Item = &str> {
        self.tags.iter().map(|t| &**t)
    }

    /// Whether `tag` is one of the accepted tags.
    pub fn contains(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| **t == *tag)
    }
}

/// Parses a tag expression; this never fails.
pub(super) fn parse_tag_expression(expr: &str) -> Filter {
    let expr = expr.trim();
    if expr.is_empty() || expr == "*" {
        return Filter::All;
    }
    let mut tags: Vec<Box<str>> = Vec::new();
    for part in expr.split("||") {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        if part == "*" {
            return Filter::All;
        }
        if !tags.iter().any(|t| **t == *part) {
            tags.push(part.into());
        }
    }
    if tags.is_empty() {
        Filter::All
    } else {
        Filter::Tags(TagSet { tags })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(expr: &str) -> TagSet {
        match parse_tag_expression(expr) {
            Filter::Tags(set) => set,
            other => panic!("expected a tag set for {expr:?}, got {other:?}"),
        }
    }

    #[test]
    fn contains_is_exact() {
        let s = set("a || bb");
        assert!(s.contains("a"));
        assert!(s.contains("bb"));
        assert!(!s.contains("b"));
        assert!(!s.contains(" a"));
        assert!(!s.contains("A"));
    }

    #[test]
    fn inner_whitespace_is_kept() {
        let s = set(" tag one ||tag two");
        assert_eq!(s.tags().collect::<Vec<_>>(), ["tag one", "tag two"]);
    }

    #[test]
    fn star_inside_a_tag_is_literal() {
        let s = set("a*||b");
        assert_eq!(s.tags().collect::<Vec<_>>(), ["a*", "b"]);
        assert!(!s.contains("abc"));
    }

    #[test]
    fn triple_pipe_leaves_a_pipe() {
        // "a|||b" splits into "a" and "|b".
        let s = set("a|||b");
        assert_eq!(s.tags().collect::<Vec<_>>(), ["a", "|b"]);
    }
}
