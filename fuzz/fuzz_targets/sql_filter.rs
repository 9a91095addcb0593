//! Subscription filters: `Filter::parse` of arbitrary text as a SQL92 and as a tag
//! expression, then evaluation against a few messages.
//!
//! Input: the expression, optionally followed by a NUL byte and lines of `key=value`
//! (message properties) or a bare word (the message tag). Besides that explicit message,
//! every parsed expression is evaluated against a message without properties and against
//! messages whose properties are named after the identifiers of the expression, with
//! values taken from a fixed palette and from the expression's own literals (so that
//! comparisons can come out TRUE, FALSE and UNKNOWN).
//!
//! Properties checked for SQL: parse errors point inside the expression; parsing is
//! deterministic; `NOT (e)` evaluates to the three-valued negation of `e`, and `(e)`,
//! `(e) AND TRUE`, `(e) OR FALSE` to the same value as `e` (wrapping a valid expression
//! may only fail on the length or depth limits). For tags: parts are trimmed, non-empty,
//! distinct, and a message matches exactly when its tag is one of them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_broker::filter::{Filter, FilterError, FilterKind, MAX_SQL_LEN, SqlExpr};
use sluice_fuzz::View;

const PALETTE: &[&str] = &[
    "",
    "0",
    "1",
    "-1",
    "42",
    "2.5",
    "1e3",
    "-0.0",
    "true",
    "FALSE",
    "x",
    "abc",
    "TagA",
    "9223372036854775807",
    "-9223372036854775808",
    "99999999999999999999",
    "NaN",
    "inf",
    "1e400",
    "ü",
    "%_",
    "'",
];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (expr, extra) = text.split_once('\0').unwrap_or((&text, ""));
    let views = views(expr, extra);
    check_sql(expr, &views);
    check_tags(expr, &views);
});

fn fnv(s: &str) -> usize {
    s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) as usize
}

/// Identifiers and literals of the expression, by a rough scan (no need to be exact).
fn scan(expr: &str) -> (Vec<String>, Vec<String>) {
    let b = expr.as_bytes();
    let ident_start = |c: u8| c.is_ascii_alphabetic() || matches!(c, b'_' | b'.' | b'$');
    let (mut idents, mut lits) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < b.len() {
        let start = i;
        if ident_start(b[i]) {
            while i < b.len() && (ident_start(b[i]) || b[i].is_ascii_digit()) {
                i += 1;
            }
            idents.push(expr[start..i].to_owned());
        } else if b[i] == b'\'' {
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                i += 1;
            }
            // Quotes are ASCII, so these are character boundaries.
            lits.push(expr[start + 1..i].to_owned());
            i += 1;
        } else if b[i].is_ascii_digit()
            || (b[i] == b'-' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            i += 1;
            while i < b.len()
                && (b[i].is_ascii_digit() || matches!(b[i], b'.' | b'e' | b'E' | b'+' | b'-'))
            {
                i += 1;
            }
            lits.push(expr[start..i].to_owned());
        } else {
            i += 1;
        }
    }
    idents.truncate(64);
    lits.truncate(64);
    (idents, lits)
}

fn views(expr: &str, extra: &str) -> Vec<View> {
    let (idents, lits) = scan(expr);
    let mut out = vec![View::default()];
    out.push(View {
        tag: Some("TagA".to_owned()),
        props: idents
            .iter()
            .map(|k| (k.clone(), PALETTE[fnv(k) % PALETTE.len()].to_owned()))
            .collect(),
    });
    if !lits.is_empty() {
        out.push(View {
            tag: lits.first().cloned(),
            props: idents
                .iter()
                .enumerate()
                .map(|(i, k)| (k.clone(), lits[i % lits.len()].clone()))
                .collect(),
        });
    }
    if !extra.is_empty() {
        let mut v = View::default();
        for line in extra.lines().take(64) {
            match line.split_once('=') {
                Some((k, val)) => v.props.push((k.to_owned(), val.to_owned())),
                None => v.tag = Some(line.to_owned()),
            }
        }
        out.push(v);
    }
    out
}

fn check_sql(expr: &str, views: &[View]) {
    let f = match Filter::parse(FilterKind::Sql, expr) {
        Ok(f) => f,
        Err(e) => {
            check_error(expr, &e);
            return;
        }
    };
    let Filter::Sql(sql) = &f else {
        panic!("SQL kind parsed to {f:?}");
    };
    assert_eq!(sql.source(), expr);
    assert_eq!(sql.to_string(), expr);
    assert_eq!(
        SqlExpr::parse(expr).as_ref(),
        Ok(sql),
        "parsing is not deterministic"
    );

    let wrapped = |w: String| match SqlExpr::parse(&w) {
        Ok(x) => Some(x),
        Err(FilterError::TooLong { .. } | FilterError::TooDeep { .. }) => None,
        Err(e) => panic!("{expr:?} parses but {w:?} does not: {e}"),
    };
    let negated = wrapped(format!("NOT ({expr})"));
    let parens = wrapped(format!("({expr})"));
    let and_true = wrapped(format!("({expr}) AND TRUE"));
    let or_false = wrapped(format!("({expr}) OR FALSE"));

    for v in views {
        let value = sql.evaluate(v);
        assert_eq!(f.matches(v), value == Some(true));
        assert_eq!(sql.matches(v), value == Some(true));
        if let Some(n) = &negated {
            assert_eq!(n.evaluate(v), value.map(|b| !b), "NOT ({expr}) on {v:?}");
        }
        for same in [&parens, &and_true, &or_false].into_iter().flatten() {
            assert_eq!(
                same.evaluate(v),
                value,
                "{} vs {expr} on {v:?}",
                same.source()
            );
        }
    }
}

fn check_error(expr: &str, e: &FilterError) {
    let _ = e.to_string();
    match e {
        FilterError::TooLong { len, max } => {
            assert_eq!((*len, *max), (expr.len(), MAX_SQL_LEN));
            assert!(expr.len() > MAX_SQL_LEN);
        }
        _ => {
            let p = e
                .position()
                .expect("syntax and depth errors have a position");
            assert!(p <= expr.len(), "position {p} past the end of {expr:?}");
            assert!(
                expr.is_char_boundary(p),
                "position {p} inside a character of {expr:?}"
            );
        }
    }
}

fn check_tags(expr: &str, views: &[View]) {
    let f = Filter::parse(FilterKind::Tag, expr).expect("tag expressions always parse");
    let trimmed = expr.trim();
    if trimmed.is_empty() || trimmed == "*" {
        assert_eq!(f, Filter::All);
    }
    match &f {
        Filter::All => {
            for v in views {
                assert!(f.matches(v));
            }
            assert!(f.matches(&View::default()));
        }
        Filter::Tags(set) => {
            let tags: Vec<&str> = set.tags().collect();
            assert!(!tags.is_empty());
            for (i, t) in tags.iter().enumerate() {
                assert!(!t.is_empty() && *t == t.trim() && *t != "*", "tag {t:?}");
                assert!(!t.contains("||"), "tag {t:?}");
                assert!(!tags[..i].contains(t), "duplicate tag {t:?}");
                assert!(set.contains(t));
                assert!(f.matches(&View::with_tag(t)));
            }
            assert!(
                !f.matches(&View::default()),
                "untagged message matched {tags:?}"
            );
            for v in views {
                let want = v.tag.as_deref().is_some_and(|t| tags.contains(&t));
                assert_eq!(f.matches(v), want, "{v:?} against {tags:?}");
            }
        }
        Filter::Sql(_) => panic!("tag kind parsed to {f:?}"),
    }
}
