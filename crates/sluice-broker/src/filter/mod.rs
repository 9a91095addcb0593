//! Subscription filters: which messages a consumer group wants to see.
//!
//! RocketMQ 5 clients subscribe with a filter expression of one of two kinds:
//!
//! * [`FilterKind::Tag`]: a `||`-separated list of tags, or `*` for everything
//!   (see [`TagSet`]).
//! * [`FilterKind::Sql`]: a SQL92 boolean expression over the message's user
//!   properties (see [`SqlExpr`] for the grammar and the exact semantics,
//!   including the three-valued logic used for missing properties).
//!
//! An expression is parsed once with [`Filter::parse`] and then evaluated for
//! every candidate message with [`Filter::matches`]. Parse failures are
//! reported as [`FilterError`], which the gRPC edge maps to
//! `ILLEGAL_FILTER_EXPRESSION`.

mod sql;
mod tag;

pub use sql::{MAX_SQL_DEPTH, MAX_SQL_LEN, SqlExpr};
pub use tag::TagSet;

/// Read access to the parts of a message that filters look at.
pub trait MessageView {
    /// The message tag, if the message has one.
    fn tag(&self) -> Option<&str>;

    /// A user property by exact (case-sensitive) key.
    ///
    /// SQL filters additionally resolve the key `TAGS` to [`MessageView::tag`]
    /// when this returns `None` for it, as RocketMQ exposes the tag under that
    /// name.
    fn property(&self, key: &str) -> Option<&str>;
}

/// The kind of a subscription filter expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FilterKind {
    /// Tag expression such as `*` or `TagA||TagB`.
    Tag,
    /// SQL92 expression over user properties such as `a > 5 AND b = 'x'`.
    Sql,
}

/// A parsed subscription filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// Every message matches (tag expression `*`, empty, or containing `*`).
    All,
    /// Messages whose tag is one of the set.
    Tags(TagSet),
    /// Messages for which the SQL92 expression evaluates to TRUE.
    Sql(SqlExpr),
}

impl Filter {
    /// Parses `expr` as a filter of the given kind.
    ///
    /// Tag expressions never fail to parse. SQL expressions fail with a
    /// [`FilterError`] describing the problem and its position.
    pub fn parse(kind: FilterKind, expr: &str) -> Result<Filter, FilterError> {
        match kind {
            FilterKind::Tag => Ok(tag::parse_tag_expression(expr)),
            FilterKind::Sql => SqlExpr::parse(expr).map(Filter::Sql),
        }
    }

    /// Whether `msg` passes this filter.
    pub fn matches(&self, msg: &dyn MessageView) -> bool {
        match self {
            Filter::All => true,
            Filter::Tags(tags) => msg.tag().is_some_and(|t| tags.contains(t)),
            Filter::Sql(expr) => expr.matches(msg),
        }
    }
}

/// Why a filter expression was rejected.
///
/// Positions are 0-based byte offsets into the expression as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FilterError {
    /// The expression exceeds [`MAX_SQL_LEN`] bytes.
    #[error("filter expression is {len} bytes long; at most {max} bytes are allowed")]
    TooLong {
        /// Length of the rejected expression in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Parentheses and `NOT`s nest deeper than [`MAX_SQL_DEPTH`].
    #[error("filter expression nests deeper than {max} levels at position {position}")]
    TooDeep {
        /// Byte offset of the `(` or `NOT` that went over the limit.
        position: usize,
        /// The limit.
        max: usize,
    },
    /// The expression is not valid.
    #[error("invalid filter expression at position {position}: {message}")]
    Syntax {
        /// Byte offset of the offending token (the expression length if the
        /// input ended too early).
        position: usize,
        /// Human-readable description of the problem.
        message: String,
    },
}

impl FilterError {
    /// Byte offset of the problem, if it has one.
    pub fn position(&self) -> Option<usize> {
        match self {
            FilterError::TooLong { .. } => None,
            FilterError::TooDeep { position, .. } | FilterError::Syntax { position, .. } => {
                Some(*position)
            }
        }
    }
}

/// A simple in-memory message for tests.
#[cfg(test)]
#[derive(Debug, Clone, Default)]
pub(crate) struct TestMessage {
    pub(crate) tag: Option<String>,
    pub(crate) props: Vec<(String, String)>,
}

#[cfg(test)]
impl TestMessage {
    pub(crate) fn with_props(props: &[(&str, &str)]) -> Self {
        TestMessage {
            tag: None,
            props: props
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    pub(crate) fn with_tag(tag: &str) -> Self {
        TestMessage {
            tag: Some(tag.to_owned()),
            props: Vec::new(),
        }
    }
}

#[cfg(test)]
impl MessageView for TestMessage {
    fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    fn property(&self, key: &str) -> Option<&str> {
        self.props
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag_filter(expr: &str) -> Filter {
        Filter::parse(FilterKind::Tag, expr).expect("tag expressions always parse")
    }

    #[test]
    fn tag_all_forms() {
        for expr in [
            "*",
            "",
            "   ",
            " * ",
            "||",
            " || || ",
            "a||*",
            "* || b",
            "a|| * ||b",
        ] {
            assert_eq!(tag_filter(expr), Filter::All, "{expr:?}");
        }
    }

    #[test]
    fn tag_set_parsing_trims_and_dedups() {
        let Filter::Tags(set) = tag_filter(" a || b||a ||||  c ") else {
            panic!("expected a tag set");
        };
        assert_eq!(set.tags().collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[test]
    fn single_pipe_is_part_of_the_tag() {
        let Filter::Tags(set) = tag_filter("a|b") else {
            panic!("expected a tag set");
        };
        assert_eq!(set.tags().collect::<Vec<_>>(), ["a|b"]);
    }

    #[test]
    fn tag_matching() {
        let f = tag_filter("TagA||TagB");
        assert!(f.matches(&TestMessage::with_tag("TagA")));
        assert!(f.matches(&TestMessage::with_tag("TagB")));
        assert!(!f.matches(&TestMessage::with_tag("TagC")));
        assert!(
            !f.matches(&TestMessage::with_tag("taga")),
            "tags are case-sensitive"
        );
        assert!(!f.matches(&TestMessage::with_tag("")));
        assert!(
            !f.matches(&TestMessage::default()),
            "untagged only matches All"
        );
    }

    #[test]
    fn all_matches_untagged() {
        assert!(tag_filter("*").matches(&TestMessage::default()));
        assert!(tag_filter("*").matches(&TestMessage::with_tag("x")));
    }

    #[test]
    fn sql_kind_dispatch() {
        let f = Filter::parse(FilterKind::Sql, "a = '1'").expect("valid");
        assert!(matches!(f, Filter::Sql(_)));
        assert!(f.matches(&TestMessage::with_props(&[("a", "1")])));
        assert!(!f.matches(&TestMessage::with_props(&[("a", "2")])));
        assert!(!f.matches(&TestMessage::default()));
    }

    #[test]
    fn sql_errors_carry_position() {
        let err = Filter::parse(FilterKind::Sql, "a = 1 )").expect_err("invalid");
        assert_eq!(err.position(), Some(6));
        assert!(err.to_string().contains("position 6"), "{err}");
        let err = Filter::parse(FilterKind::Sql, &"x".repeat(MAX_SQL_LEN + 1)).expect_err("long");
        assert_eq!(err.position(), None);
        assert!(matches!(err, FilterError::TooLong { .. }));
    }

    #[test]
    fn sql_tags_property_falls_back_to_tag() {
        let f = Filter::parse(FilterKind::Sql, "TAGS IN ('TagA', 'TagB')").expect("valid");
        assert!(f.matches(&TestMessage::with_tag("TagA")));
        assert!(!f.matches(&TestMessage::with_tag("TagC")));
        assert!(!f.matches(&TestMessage::default()));
    }
}
