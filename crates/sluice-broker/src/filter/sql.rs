//! SQL92 property filters, the subset of SQL92 that RocketMQ accepts.
//!
//! # Grammar
//!
//! ```text
//! expr       := and ( OR and )*
//! and        := not ( AND not )*
//! not        := NOT not | predicate
//! predicate  := '(' expr ')'
//!             | TRUE | FALSE
//!             | operand cmp operand          -- at least one side a property
//!             | prop [NOT] BETWEEN number AND number
//!             | prop [NOT] IN '(' string ( ',' string )* ')'
//!             | prop IS [NOT] NULL
//!             | prop [NOT] LIKE string [ ESCAPE string ]
//!             | prop [NOT] ( CONTAINS | STARTSWITH | ENDSWITH ) string
//! cmp        := '=' | '<>' | '!=' | '>' | '>=' | '<' | '<='
//! operand    := prop | string | number | TRUE | FALSE | NULL
//! ```
//!
//! Keywords are case-insensitive; property names are case-sensitive and made
//! of ASCII letters, digits, `_`, `.` and `$`, not starting with a digit.
//! Strings are single-quoted with `''` standing for a quote. Numbers are
//! 64-bit integers (`-12`) or decimals (`1.5`, `2e3`). `LIKE` patterns use
//! `%` (any run of characters) and `_` (exactly one character).
//!
//! Static typing follows RocketMQ: `>`, `>=`, `<`, `<=` and `BETWEEN` need
//! numeric literals (a string or boolean literal there is a parse error),
//! `BETWEEN`'s lower bound must not exceed its upper bound, `IN` lists hold
//! strings only, and `NULL` can only be tested with `IS [NOT] NULL`. A
//! comparison between two literals is rejected.
//!
//! # Evaluation
//!
//! Property values are strings and are converted to the literal's type when
//! compared: against an integer literal the value must be a 64-bit integer,
//! against a decimal literal any decimal number, against `TRUE`/`FALSE` the
//! words `true`/`false` (ASCII case-insensitive). Two properties compare as
//! strings for `=`/`<>` and as decimal numbers otherwise. A value that does not
//! convert makes the predicate FALSE (this includes the negated forms such as
//! `<>` and `NOT BETWEEN`); RocketMQ raises an evaluation error there, which
//! also rejects the message.
//!
//! The property `TAGS` resolves to the message tag when the message has no
//! property of that name.
//!
//! **Missing properties use SQL three-valued logic.** Every predicate on a
//! property the message does not have (comparison, `BETWEEN`, `IN`, `LIKE`,
//! `CONTAINS`, ... and their `NOT` forms) is UNKNOWN, except `IS [NOT] NULL`,
//! which is always TRUE or FALSE. `NOT UNKNOWN` is UNKNOWN; `AND` is FALSE if
//! any side is FALSE, `OR` is TRUE if any side is TRUE, and UNKNOWN otherwise
//! when a side is UNKNOWN. A message matches only if the whole expression is
//! TRUE, so both `a > 1` and `NOT (a > 1)` reject a message without `a`. This
//! is what RocketMQ does for comparisons, `BETWEEN` and `IN`. RocketMQ's string
//! operators instead return FALSE for a missing property, which differs only
//! under an outer `NOT`: there RocketMQ would accept the message and we do
//! not. As in RocketMQ, `CONTAINS`, `STARTSWITH` and `ENDSWITH` with an empty
//! search string are FALSE for every present value, negated or not.
//!
//! # Limits
//!
//! Expressions longer than [`MAX_SQL_LEN`] bytes, or with parentheses and
//! `NOT`s nested deeper than [`MAX_SQL_DEPTH`], are rejected, so parsing and
//! evaluation recursion stay bounded. Chains of `AND`/`OR` are kept flat and
//! do not count towards the depth.

use std::cmp::Ordering;
use std::fmt;

use super::{FilterError, MessageView};

/// Maximum length of a SQL filter expression, in bytes.
pub const MAX_SQL_LEN: usize = 4096;

/// Maximum nesting of parentheses and `NOT` in a SQL filter expression.
pub const MAX_SQL_DEPTH: usize = 64;

/// The property name under which the message tag is visible.
const TAGS_PROPERTY: &str = "TAGS";

/// A parsed SQL92 filter expression.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlExpr {
    source: Box<str>,
    root: Node,
}

impl SqlExpr {
    /// Parses a SQL92 filter expression.
    pub fn parse(expr: &str) -> Result<SqlExpr, FilterError> {
        if expr.len() > MAX_SQL_LEN {
            return Err(FilterError::TooLong {
                len: expr.len(),
                max: MAX_SQL_LEN,
            });
        }
        let tokens = lex(expr)?;
        let mut parser = Parser {
            src: expr,
            tokens,
            pos: 0,
        };
        let root = parser.parse_expression()?;
        Ok(SqlExpr {
            source: expr.into(),
            root,
        })
    }

    /// The expression text this was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the expression with three-valued logic: `Some(true)` is TRUE,
    /// `Some(false)` FALSE and `None` UNKNOWN.
    pub fn evaluate(&self, msg: &dyn MessageView) -> Option<bool> {
        self.root.eval(msg)
    }

    /// Whether the expression is TRUE for `msg`.
    pub fn matches(&self, msg: &dyn MessageView) -> bool {
        self.evaluate(msg) == Some(true)
    }
}

impl fmt::Display for SqlExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

// ---------------------------------------------------------------------------
// AST and evaluation

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

impl CmpOp {
    fn holds(self, ord: Ordering) -> bool {
        match self {
            CmpOp::Eq => ord == Ordering::Equal,
            CmpOp::Ne => ord != Ordering::Equal,
            CmpOp::Gt => ord == Ordering::Greater,
            CmpOp::Ge => ord != Ordering::Less,
            CmpOp::Lt => ord == Ordering::Less,
            CmpOp::Le => ord != Ordering::Greater,
        }
    }

    /// The operator that gives the same result with the operands swapped.
    fn swapped(self) -> CmpOp {
        match self {
            CmpOp::Eq | CmpOp::Ne => self,
            CmpOp::Gt => CmpOp::Lt,
            CmpOp::Ge => CmpOp::Le,
            CmpOp::Lt => CmpOp::Gt,
            CmpOp::Le => CmpOp::Ge,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "<>",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    Int(i64),
    Dec(f64),
}

impl Num {
    fn cmp_num(self, other: Num) -> Option<Ordering> {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => Some(a.cmp(&b)),
            (a, b) => a.as_f64().partial_cmp(&b.as_f64()),
        }
    }

    #[allow(clippy::cast_precision_loss)]
    fn as_f64(self) -> f64 {
        match self {
            Num::Int(v) => v as f64,
            Num::Dec(v) => v,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TextOp {
    Contains,
    StartsWith,
    EndsWith,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LikeTok {
    /// `%`: any run of characters, possibly empty.
    AnyRun,
    /// `_`: exactly one character.
    AnyChar,
    /// A character that must appear as is.
    Lit(char),
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Const(bool),
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
    IsNull {
        prop: Box<str>,
        negated: bool,
    },
    /// `prop = 'x'` / `prop <> 'x'`.
    StrEq {
        prop: Box<str>,
        value: Box<str>,
        negated: bool,
    },
    /// `prop = TRUE` / `prop <> FALSE`.
    BoolEq {
        prop: Box<str>,
        value: bool,
        negated: bool,
    },
    NumCmp {
        prop: Box<str>,
        op: CmpOp,
        value: Num,
    },
    PropCmp {
        left: Box<str>,
        op: CmpOp,
        right: Box<str>,
    },
    Between {
        prop: Box<str>,
        low: Num,
        high: Num,
        negated: bool,
    },
    In {
        prop: Box<str>,
        values: Vec<Box<str>>,
        negated: bool,
    },
    Like {
        prop: Box<str>,
        pattern: Vec<LikeTok>,
        negated: bool,
    },
    Text {
        prop: Box<str>,
        op: TextOp,
        needle: Box<str>,
        negated: bool,
    },
}

/// Looks a property up, resolving `TAGS` to the tag when it is not a property.
fn lookup<'m>(msg: &'m dyn MessageView, key: &str) -> Option<&'m str> {
    match msg.property(key) {
        Some(v) => Some(v),
        None if key == TAGS_PROPERTY => msg.tag(),
        None => None,
    }
}

/// Parses a property value as a 64-bit integer (like Java's `Long.valueOf`).
fn parse_int(value: &str) -> Option<i64> {
    value.parse().ok()
}

/// Parses a property value as a decimal number. Only plain decimal notation
/// is accepted (no `NaN`, `inf` or surrounding whitespace).
fn parse_decimal(value: &str) -> Option<f64> {
    let plain = value
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E'));
    if plain && value.bytes().any(|b| b.is_ascii_digit()) {
        value.parse().ok()
    } else {
        None
    }
}

fn parse_bool(value: &str) -> Option<bool> {
    if value.eq_ignore_ascii_case("true") {
        Some(true)
    } else if value.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// Compares a property value with a numeric literal, converting the value to
/// the literal's type; `None` if it does not convert.
fn compare_value(value: &str, literal: Num) -> Option<Ordering> {
    match literal {
        Num::Int(n) => parse_int(value).map(|v| v.cmp(&n)),
        Num::Dec(d) => parse_decimal(value).and_then(|v| v.partial_cmp(&d)),
    }
}

/// Matches `text` against a compiled LIKE pattern. Runs in
/// O(len(text) * len(pattern)) time without allocating.
fn like_match(pattern: &[LikeTok], text: &str) -> bool {
    let mut p = 0;
    let mut t = 0;
    // Pattern index just after the last `%` seen and the text position that
    // `%` is currently assumed to extend to.
    let mut resume: Option<(usize, usize)> = None;
    loop {
        let next_char = text.get(t..).and_then(|rest| rest.chars().next());
        let advanced = match pattern.get(p) {
            Some(LikeTok::AnyRun) => {
                p += 1;
                resume = Some((p, t));
                continue;
            }
            Some(LikeTok::AnyChar) => next_char.map(char::len_utf8),
            Some(LikeTok::Lit(want)) => next_char.filter(|c| c == want).map(char::len_utf8),
            None if next_char.is_none() => return true,
            None => None,
        };
        if let Some(len) = advanced {
            p += 1;
            t += len;
            continue;
        }
        // Mismatch: let the last `%` swallow one more character.
        let Some((resume_p, resume_t)) = resume else {
            return false;
        };
        let Some(c) = text.get(resume_t..).and_then(|rest| rest.chars().next()) else {
            return false;
        };
        let resume_t = resume_t + c.len_utf8();
        resume = Some((resume_p, resume_t));
        p = resume_p;
        t = resume_t;
    }
}

impl Node {
    fn eval(&self, msg: &dyn MessageView) -> Option<bool> {
        match self {
            Node::Const(b) => Some(*b),
            Node::And(items) => {
                let mut unknown = false;
                for item in items {
                    match item.eval(msg) {
                        Some(false) => return Some(false),
                        None => unknown = true,
                        Some(true) => {}
                    }
                }
                if unknown { None } else { Some(true) }
            }
            Node::Or(items) => {
                let mut unknown = false;
                for item in items {
                    match item.eval(msg) {
                        Some(true) => return Some(true),
                        None => unknown = true,
                        Some(false) => {}
                    }
                }
                if unknown { None } else { Some(false) }
            }
            Node::Not(inner) => inner.eval(msg).map(|b| !b),
            Node::IsNull { prop, negated } => Some(lookup(msg, prop).is_none() != *negated),
            Node::StrEq {
                prop,
                value,
                negated,
            } => lookup(msg, prop).map(|v| (v == &**value) != *negated),
            Node::BoolEq {
                prop,
                value,
                negated,
            } => {
                let v = lookup(msg, prop)?;
                Some(parse_bool(v).is_some_and(|b| (b == *value) != *negated))
            }
            Node::NumCmp { prop, op, value } => {
                let v = lookup(msg, prop)?;
                Some(compare_value(v, *value).is_some_and(|ord| op.holds(ord)))
            }
            Node::PropCmp { left, op, right } => {
                let l = lookup(msg, left)?;
                let r = lookup(msg, right)?;
                Some(match op {
                    CmpOp::Eq => l == r,
                    CmpOp::Ne => l != r,
                    _ => match (parse_decimal(l), parse_decimal(r)) {
                        (Some(a), Some(b)) => a.partial_cmp(&b).is_some_and(|ord| op.holds(ord)),
                        _ => false,
                    },
                })
            }
            Node::Between {
                prop,
                low,
                high,
                negated,
            } => {
                let v = lookup(msg, prop)?;
                let (Some(vs_low), Some(vs_high)) =
                    (compare_value(v, *low), compare_value(v, *high))
                else {
                    return Some(false);
                };
                let inside = vs_low != Ordering::Less && vs_high != Ordering::Greater;
                Some(inside != *negated)
            }
            Node::In {
                prop,
                values,
                negated,
            } => {
                let v = lookup(msg, prop)?;
                Some(values.iter().any(|x| **x == *v) != *negated)
            }
            Node::Like {
                prop,
                pattern,
                negated,
            } => lookup(msg, prop).map(|v| like_match(pattern, v) != *negated),
            Node::Text {
                prop,
                op,
                needle,
                negated,
            } => {
                let v = lookup(msg, prop)?;
                if needle.is_empty() {
                    return Some(false);
                }
                let hit = match op {
                    TextOp::Contains => v.contains(&**needle),
                    TextOp::StartsWith => v.starts_with(&**needle),
                    TextOp::EndsWith => v.ends_with(&**needle),
                };
                Some(hit != *negated)
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kw {
    And,
    Or,
    Not,
    Between,
    In,
    Is,
    Null,
    Like,
    Escape,
    Contains,
    StartsWith,
    EndsWith,
    True,
    False,
}

const KEYWORDS: [(&str, Kw); 14] = [
    ("AND", Kw::And),
    ("OR", Kw::Or),
    ("NOT", Kw::Not),
    ("BETWEEN", Kw::Between),
    ("IN", Kw::In),
    ("IS", Kw::Is),
    ("NULL", Kw::Null),
    ("LIKE", Kw::Like),
    ("ESCAPE", Kw::Escape),
    ("CONTAINS", Kw::Contains),
    ("STARTSWITH", Kw::StartsWith),
    ("ENDSWITH", Kw::EndsWith),
    ("TRUE", Kw::True),
    ("FALSE", Kw::False),
];

#[derive(Debug, Clone, PartialEq)]
enum TokKind {
    /// A property name; its text is the token's span.
    Ident,
    Str(String),
    Int(i64),
    Dec(f64),
    Kw(Kw),
    Op(CmpOp),
    LParen,
    RParen,
    Comma,
    Eof,
}

#[derive(Debug, Clone, PartialEq)]
struct Token {
    kind: TokKind,
    start: usize,
    end: usize,
}

fn syntax(position: usize, message: impl Into<String>) -> FilterError {
    FilterError::Syntax {
        position,
        message: message.into(),
    }
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || matches!(b, b'_' | b'.' | b'$')
}

fn is_ident_part(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit()
}

fn lex(src: &str) -> Result<Vec<Token>, FilterError> {
    let bytes = src.as_bytes();
    let at = |i: usize| bytes.get(i).copied();
    let mut tokens = Vec::new();
    let mut i = 0;
    while let Some(b) = at(i) {
        let start = i;
        let kind = match b {
            b' ' | b'\t' | b'\n' | b'\r' | 0x0c => {
                i += 1;
                continue;
            }
            b'(' => {
                i += 1;
                TokKind::LParen
            }
            b')' => {
                i += 1;
                TokKind::RParen
            }
            b',' => {
                i += 1;
                TokKind::Comma
            }
            b'=' => {
                i += 1;
                TokKind::Op(CmpOp::Eq)
            }
            b'<' => match at(i + 1) {
                Some(b'=') => {
                    i += 2;
                    TokKind::Op(CmpOp::Le)
                }
                Some(b'>') => {
                    i += 2;
                    TokKind::Op(CmpOp::Ne)
                }
                _ => {
                    i += 1;
                    TokKind::Op(CmpOp::Lt)
                }
            },
            b'>' => {
                if at(i + 1) == Some(b'=') {
                    i += 2;
                    TokKind::Op(CmpOp::Ge)
                } else {
                    i += 1;
                    TokKind::Op(CmpOp::Gt)
                }
            }
            b'!' => {
                if at(i + 1) == Some(b'=') {
                    i += 2;
                    TokKind::Op(CmpOp::Ne)
                } else {
                    return Err(syntax(i, "unexpected '!'; did you mean '!='?"));
                }
            }
            b'\'' => {
                let (value, end) = lex_string(src, i)?;
                i = end;
                TokKind::Str(value)
            }
            b'-' | b'0'..=b'9' => {
                let (kind, end) = lex_number(src, i)?;
                i = end;
                kind
            }
            b if is_ident_start(b) => {
                while at(i).is_some_and(is_ident_part) {
                    i += 1;
                }
                let word = src.get(start..i).unwrap_or_default();
                KEYWORDS
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(word))
                    .map_or(TokKind::Ident, |(_, kw)| TokKind::Kw(*kw))
            }
            _ => {
                let c = src
                    .get(i..)
                    .and_then(|rest| rest.chars().next())
                    .unwrap_or(char::REPLACEMENT_CHARACTER);
                return Err(syntax(i, format!("unexpected character {c:?}")));
            }
        };
        tokens.push(Token {
            kind,
            start,
            end: i,
        });
    }
    tokens.push(Token {
        kind: TokKind::Eof,
        start: src.len(),
        end: src.len(),
    });
    Ok(tokens)
}

/// Lexes a quoted string starting at the quote at `start`; returns the value
/// and the offset just after the closing quote.
fn lex_string(src: &str, start: usize) -> Result<(String, usize), FilterError> {
    let bytes = src.as_bytes();
    let mut value = String::new();
    let mut segment = start + 1;
    let mut i = start + 1;
    loop {
        match bytes.get(i) {
            None => return Err(syntax(start, "unterminated string literal")),
            Some(b'\'') => {
                // Quotes are ASCII, so these are character boundaries.
                value.push_str(src.get(segment..i).unwrap_or_default());
                if bytes.get(i + 1) == Some(&b'\'') {
                    value.push('\'');
                    i += 2;
                    segment = i;
                } else {
                    return Ok((value, i + 1));
                }
            }
            Some(_) => i += 1,
        }
    }
}

/// Lexes an integer or decimal literal (optionally negative) at `start`.
fn lex_number(src: &str, start: usize) -> Result<(TokKind, usize), FilterError> {
    let bytes = src.as_bytes();
    let digit_at = |i: usize| bytes.get(i).is_some_and(u8::is_ascii_digit);
    let mut i = start;
    if bytes.get(i) == Some(&b'-') {
        if !digit_at(i + 1) {
            return Err(syntax(
                start,
                "unexpected '-'; only numeric literals may be negative",
            ));
        }
        i += 1;
    }
    while digit_at(i) {
        i += 1;
    }
    let mut decimal = false;
    if bytes.get(i) == Some(&b'.') && digit_at(i + 1) {
        decimal = true;
        i += 1;
        while digit_at(i) {
            i += 1;
        }
    }
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(bytes.get(i + 1), Some(b'+' | b'-')));
        if digit_at(i + 1 + sign) {
            decimal = true;
            i += 1 + sign;
            while digit_at(i) {
                i += 1;
            }
        }
    }
    if let Some(&b) = bytes.get(i)
        && is_ident_part(b)
    {
        return Err(syntax(
            i,
            format!(
                "unexpected character {:?} in numeric literal",
                char::from(b)
            ),
        ));
    }
    let text = src.get(start..i).unwrap_or_default();
    let kind = if decimal {
        match text.parse::<f64>() {
            Ok(v) if v.is_finite() => TokKind::Dec(v),
            _ => {
                return Err(syntax(
                    start,
                    format!("decimal literal {text} is out of range"),
                ));
            }
        }
    } else {
        match text.parse::<i64>() {
            Ok(v) => TokKind::Int(v),
            Err(_) => {
                return Err(syntax(
                    start,
                    format!("integer literal {text} does not fit in 64 bits"),
                ));
            }
        }
    };
    Ok((kind, i))
}

// ---------------------------------------------------------------------------
// Parser

/// One side of a comparison.
enum Operand {
    Prop(Box<str>),
    Lit(Lit),
}

enum Lit {
    Str(String),
    Num(Num),
    Bool(bool),
    Null,
}

static FALLBACK_EOF: Token = Token {
    kind: TokKind::Eof,
    start: 0,
    end: 0,
};

struct Parser<'a> {
    src: &'a str,
    /// Always ends with an `Eof` token, which is never consumed.
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> &Token {
        self.tokens.get(self.pos).unwrap_or(&FALLBACK_EOF)
    }

    fn peek_kw(&self) -> Option<Kw> {
        match self.peek().kind {
            TokKind::Kw(kw) => Some(kw),
            _ => None,
        }
    }

    /// Consumes and returns the next token (the final `Eof` stays in place).
    fn bump(&mut self) -> Token {
        match self.tokens.get_mut(self.pos) {
            Some(tok) if tok.kind != TokKind::Eof => {
                self.pos += 1;
                let placeholder = Token {
                    kind: TokKind::Eof,
                    start: tok.start,
                    end: tok.end,
                };
                std::mem::replace(tok, placeholder)
            }
            Some(tok) => tok.clone(),
            None => FALLBACK_EOF.clone(),
        }
    }

    fn eat_kw(&mut self, kw: Kw) -> bool {
        if self.peek_kw() == Some(kw) {
            self.bump();
            true
        } else {
            false
        }
    }

    /// Quotes a token's text for error messages, shortened if long. Only the
    /// span is used, so a consumed token still describes itself.
    fn describe(&self, tok: &Token) -> String {
        if tok.start >= tok.end {
            return "end of input".to_owned();
        }
        let text = self.src.get(tok.start..tok.end).unwrap_or_default();
        const MAX_CHARS: usize = 32;
        match text.char_indices().nth(MAX_CHARS) {
            Some((cut, _)) => format!("'{}...'", text.get(..cut).unwrap_or_default()),
            None => format!("'{text}'"),
        }
    }

    fn unexpected(&self, tok: &Token, expected: &str) -> FilterError {
        syntax(
            tok.start,
            format!("expected {expected}, found {}", self.describe(tok)),
        )
    }

    fn enter(depth: usize, position: usize) -> Result<usize, FilterError> {
        let depth = depth + 1;
        if depth > MAX_SQL_DEPTH {
            Err(FilterError::TooDeep {
                position,
                max: MAX_SQL_DEPTH,
            })
        } else {
            Ok(depth)
        }
    }

    fn parse_expression(&mut self) -> Result<Node, FilterError> {
        if self.peek().kind == TokKind::Eof {
            return Err(syntax(self.peek().start, "empty expression"));
        }
        let node = self.parse_or(0)?;
        let tok = self.peek();
        match tok.kind {
            TokKind::Eof => Ok(node),
            TokKind::RParen => Err(syntax(tok.start, "unbalanced ')'")),
            _ => Err(syntax(
                tok.start,
                format!(
                    "unexpected {} after a complete expression; expected AND, OR or the end",
                    self.describe(tok)
                ),
            )),
        }
    }

    fn parse_or(&mut self, depth: usize) -> Result<Node, FilterError> {
        let first = self.parse_and(depth)?;
        if self.peek_kw() != Some(Kw::Or) {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.eat_kw(Kw::Or) {
            items.push(self.parse_and(depth)?);
        }
        Ok(Node::Or(items))
    }

    fn parse_and(&mut self, depth: usize) -> Result<Node, FilterError> {
        let first = self.parse_not(depth)?;
        if self.peek_kw() != Some(Kw::And) {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.eat_kw(Kw::And) {
            items.push(self.parse_not(depth)?);
        }
        Ok(Node::And(items))
    }

    fn parse_not(&mut self, depth: usize) -> Result<Node, FilterError> {
        if self.peek_kw() == Some(Kw::Not) {
            let depth = Self::enter(depth, self.peek().start)?;
            self.bump();
            let inner = self.parse_not(depth)?;
            return Ok(Node::Not(Box::new(inner)));
        }
        self.parse_predicate(depth)
    }

    fn parse_predicate(&mut self, depth: usize) -> Result<Node, FilterError> {
        if self.peek().kind == TokKind::LParen {
            let open = self.bump();
            let depth = Self::enter(depth, open.start)?;
            let inner = self.parse_or(depth)?;
            let close = self.peek();
            if close.kind != TokKind::RParen {
                let expected = format!("')' to close the '(' at position {}", open.start);
                return Err(self.unexpected(close, &expected));
            }
            self.bump();
            return Ok(inner);
        }

        let (left, left_tok) = self.parse_operand()?;
        let next = self.peek();
        match next.kind {
            TokKind::Op(op) => {
                let op_pos = next.start;
                self.bump();
                let (right, right_tok) = self.parse_operand()?;
                Self::comparison(left, &left_tok, op, op_pos, right, &right_tok)
            }
            TokKind::Kw(Kw::Not) => {
                let not_tok = self.bump();
                match self.peek_kw() {
                    Some(
                        Kw::Between
                        | Kw::In
                        | Kw::Like
                        | Kw::Contains
                        | Kw::StartsWith
                        | Kw::EndsWith,
                    ) => {
                        let prop = self.require_prop(left, &left_tok, &not_tok)?;
                        self.parse_suffix(prop, true)
                    }
                    _ => Err(self.unexpected(
                        self.peek(),
                        "BETWEEN, IN, LIKE, CONTAINS, STARTSWITH or ENDSWITH after NOT",
                    )),
                }
            }
            TokKind::Kw(
                Kw::Between | Kw::In | Kw::Like | Kw::Contains | Kw::StartsWith | Kw::EndsWith,
            ) => {
                let op_tok = next.clone();
                let prop = self.require_prop(left, &left_tok, &op_tok)?;
                self.parse_suffix(prop, false)
            }
            TokKind::Kw(Kw::Is) => {
                let is_tok = self.bump();
                let prop = self.require_prop(left, &left_tok, &is_tok)?;
                let negated = self.eat_kw(Kw::Not);
                if !self.eat_kw(Kw::Null) {
                    let expected = if negated { "NULL" } else { "NULL or NOT NULL" };
                    return Err(self.unexpected(self.peek(), expected));
                }
                Ok(Node::IsNull { prop, negated })
            }
            _ => match left {
                Operand::Lit(Lit::Bool(b)) => Ok(Node::Const(b)),
                _ => Err(syntax(
                    next.start,
                    format!(
                        "expected a comparison operator, BETWEEN, IN, IS, LIKE, CONTAINS, \
                         STARTSWITH or ENDSWITH after {}, found {}",
                        self.describe(&left_tok),
                        self.describe(next)
                    ),
                )),
            },
        }
    }

    /// Parses a property name or a literal.
    fn parse_operand(&mut self) -> Result<(Operand, Token), FilterError> {
        let mut tok = self.bump();
        let kind = std::mem::replace(&mut tok.kind, TokKind::Eof);
        let operand = match kind {
            TokKind::Ident => {
                Operand::Prop(self.src.get(tok.start..tok.end).unwrap_or_default().into())
            }
            TokKind::Str(s) => Operand::Lit(Lit::Str(s)),
            TokKind::Int(v) => Operand::Lit(Lit::Num(Num::Int(v))),
            TokKind::Dec(v) => Operand::Lit(Lit::Num(Num::Dec(v))),
            TokKind::Kw(Kw::True) => Operand::Lit(Lit::Bool(true)),
            TokKind::Kw(Kw::False) => Operand::Lit(Lit::Bool(false)),
            TokKind::Kw(Kw::Null) => Operand::Lit(Lit::Null),
            _ => return Err(self.unexpected(&tok, "a property name or a literal")),
        };
        // `tok` keeps the span for later error messages.
        Ok((operand, tok))
    }

    fn require_prop(
        &self,
        operand: Operand,
        operand_tok: &Token,
        op_tok: &Token,
    ) -> Result<Box<str>, FilterError> {
        match operand {
            Operand::Prop(name) => Ok(name),
            Operand::Lit(_) => Err(syntax(
                operand_tok.start,
                format!(
                    "{} needs a property name on its left, found {}",
                    self.describe(op_tok).to_uppercase(),
                    self.describe(operand_tok)
                ),
            )),
        }
    }

    fn comparison(
        left: Operand,
        left_tok: &Token,
        op: CmpOp,
        op_pos: usize,
        right: Operand,
        right_tok: &Token,
    ) -> Result<Node, FilterError> {
        match (left, right) {
            (Operand::Prop(left), Operand::Prop(right)) => Ok(Node::PropCmp { left, op, right }),
            (Operand::Prop(prop), Operand::Lit(lit)) => {
                Self::literal_comparison(prop, op, op_pos, lit, right_tok.start)
            }
            (Operand::Lit(lit), Operand::Prop(prop)) => {
                Self::literal_comparison(prop, op.swapped(), op_pos, lit, left_tok.start)
            }
            (Operand::Lit(_), Operand::Lit(_)) => Err(syntax(
                left_tok.start,
                "a comparison needs a property name on at least one side",
            )),
        }
    }

    fn literal_comparison(
        prop: Box<str>,
        op: CmpOp,
        op_pos: usize,
        lit: Lit,
        lit_pos: usize,
    ) -> Result<Node, FilterError> {
        let negated = match op {
            CmpOp::Eq => false,
            CmpOp::Ne => true,
            _ => {
                let what = match lit {
                    Lit::Num(value) => return Ok(Node::NumCmp { prop, op, value }),
                    Lit::Str(_) => "a string literal",
                    Lit::Bool(_) => "a boolean literal",
                    Lit::Null => "NULL",
                };
                return Err(syntax(
                    op_pos,
                    format!(
                        "operator '{}' needs a numeric literal, not {what}; \
                         only '=' and '<>' compare strings and booleans",
                        op.symbol()
                    ),
                ));
            }
        };
        match lit {
            Lit::Str(value) => Ok(Node::StrEq {
                prop,
                value: value.into(),
                negated,
            }),
            Lit::Bool(value) => Ok(Node::BoolEq {
                prop,
                value,
                negated,
            }),
            Lit::Num(value) => Ok(Node::NumCmp { prop, op, value }),
            Lit::Null => Err(syntax(
                lit_pos,
                "NULL cannot be compared with '=' or '<>'; use IS NULL or IS NOT NULL",
            )),
        }
    }

    /// Parses what follows `prop [NOT]` for BETWEEN, IN, LIKE and the string
    /// operators; the keyword is the next token.
    fn parse_suffix(&mut self, prop: Box<str>, negated: bool) -> Result<Node, FilterError> {
        let kw_tok = self.bump();
        match kw_tok.kind {
            TokKind::Kw(Kw::Between) => {
                let (low, low_pos) = self.expect_number("a numeric lower bound after BETWEEN")?;
                if !self.eat_kw(Kw::And) {
                    return Err(self.unexpected(self.peek(), "AND between the BETWEEN bounds"));
                }
                let (high, _) = self.expect_number("a numeric upper bound after AND")?;
                if low.cmp_num(high) == Some(Ordering::Greater) {
                    return Err(syntax(
                        low_pos,
                        "the lower bound of BETWEEN is greater than the upper bound",
                    ));
                }
                Ok(Node::Between {
                    prop,
                    low,
                    high,
                    negated,
                })
            }
            TokKind::Kw(Kw::In) => {
                let open = self.peek();
                if open.kind != TokKind::LParen {
                    return Err(self.unexpected(open, "'(' after IN"));
                }
                self.bump();
                if self.peek().kind == TokKind::RParen {
                    return Err(syntax(
                        self.peek().start,
                        "the IN list needs at least one string literal",
                    ));
                }
                let mut values: Vec<Box<str>> = Vec::new();
                loop {
                    let (value, _) = self.expect_string("a string literal in the IN list")?;
                    values.push(value.into());
                    let sep = self.bump();
                    match sep.kind {
                        TokKind::Comma => {}
                        TokKind::RParen => break,
                        _ => return Err(self.unexpected(&sep, "',' or ')' in the IN list")),
                    }
                }
                Ok(Node::In {
                    prop,
                    values,
                    negated,
                })
            }
            TokKind::Kw(Kw::Like) => {
                let (pattern, pattern_pos) = self.expect_string("a string pattern after LIKE")?;
                let escape = if self.eat_kw(Kw::Escape) {
                    let (escape, escape_pos) = self.expect_string("a string after ESCAPE")?;
                    let mut chars = escape.chars();
                    match (chars.next(), chars.next()) {
                        (Some(c), None) => Some(c),
                        _ => {
                            return Err(syntax(
                                escape_pos,
                                "the ESCAPE string must be exactly one character",
                            ));
                        }
                    }
                } else {
                    None
                };
                let pattern = compile_like(&pattern, escape).ok_or_else(|| {
                    syntax(pattern_pos, "LIKE pattern ends with its escape character")
                })?;
                Ok(Node::Like {
                    prop,
                    pattern,
                    negated,
                })
            }
            TokKind::Kw(kw @ (Kw::Contains | Kw::StartsWith | Kw::EndsWith)) => {
                let op = match kw {
                    Kw::Contains => TextOp::Contains,
                    Kw::StartsWith => TextOp::StartsWith,
                    _ => TextOp::EndsWith,
                };
                let expected = format!("a string literal after {}", self.describe(&kw_tok));
                let (needle, _) = self.expect_string(&expected)?;
                Ok(Node::Text {
                    prop,
                    op,
                    needle: needle.into(),
                    negated,
                })
            }
            _ => Err(self.unexpected(
                &kw_tok,
                "BETWEEN, IN, LIKE, CONTAINS, STARTSWITH or ENDSWITH",
            )),
        }
    }

    fn expect_number(&mut self, expected: &str) -> Result<(Num, usize), FilterError> {
        let tok = self.peek();
        let num = match tok.kind {
            TokKind::Int(v) => Num::Int(v),
            TokKind::Dec(v) => Num::Dec(v),
            _ => return Err(self.unexpected(tok, expected)),
        };
        let pos = tok.start;
        self.bump();
        Ok((num, pos))
    }

    fn expect_string(&mut self, expected: &str) -> Result<(String, usize), FilterError> {
        let tok = self.bump();
        match tok.kind {
            TokKind::Str(s) => Ok((s, tok.start)),
            _ => Err(self.unexpected(&tok, expected)),
        }
    }
}

/// Compiles a LIKE pattern; `None` if it ends with a dangling escape.
fn compile_like(pattern: &str, escape: Option<char>) -> Option<Vec<LikeTok>> {
    let mut out = Vec::with_capacity(pattern.len());
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        let tok = if Some(c) == escape {
            LikeTok::Lit(chars.next()?)
        } else if c == '%' {
            if out.last() == Some(&LikeTok::AnyRun) {
                continue;
            }
            LikeTok::AnyRun
        } else if c == '_' {
            LikeTok::AnyChar
        } else {
            LikeTok::Lit(c)
        };
        out.push(tok);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::TestMessage;
    use proptest::prelude::*;

    fn parse(expr: &str) -> SqlExpr {
        match SqlExpr::parse(expr) {
            Ok(e) => e,
            Err(err) => panic!("{expr:?} should parse: {err}"),
        }
    }

    fn eval(expr: &str, props: &[(&str, &str)]) -> Option<bool> {
        parse(expr).evaluate(&TestMessage::with_props(props))
    }

    fn is_true(expr: &str, props: &[(&str, &str)]) -> bool {
        eval(expr, props) == Some(true)
    }

    fn err(expr: &str) -> FilterError {
        match SqlExpr::parse(expr) {
            Ok(e) => panic!("{expr:?} should not parse, got {e:?}"),
            Err(err) => err,
        }
    }

    fn err_pos(expr: &str) -> usize {
        let e = err(expr);
        e.position()
            .unwrap_or_else(|| panic!("{expr:?}: error without position: {e}"))
    }

    // ----- comparisons ---------------------------------------------------

    #[test]
    fn integer_comparisons() {
        let p = [("a", "5")];
        let cases = [
            ("a = 5", true),
            ("a = 4", false),
            ("a <> 5", false),
            ("a <> 4", true),
            ("a != 4", true),
            ("a != 5", false),
            ("a > 4", true),
            ("a > 5", false),
            ("a >= 5", true),
            ("a >= 6", false),
            ("a < 6", true),
            ("a < 5", false),
            ("a <= 5", true),
            ("a <= 4", false),
            ("a>4", true),
            ("a>=-5", true),
        ];
        for (expr, want) in cases {
            assert_eq!(eval(expr, &p), Some(want), "{expr}");
        }
    }

    #[test]
    fn negative_and_extreme_integers() {
        assert!(is_true("a = -3", &[("a", "-3")]));
        assert!(is_true("a < -2", &[("a", "-3")]));
        assert!(is_true("a > -4", &[("a", "-3")]));
        assert!(is_true("a = 3", &[("a", "+3")]));
        assert!(is_true(
            "a = -9223372036854775808",
            &[("a", "-9223372036854775808")]
        ));
        assert!(is_true(
            "a = 9223372036854775807",
            &[("a", "9223372036854775807")]
        ));
        // Exact 64-bit comparison, no rounding through f64.
        assert!(is_true(
            "a > 9007199254740992",
            &[("a", "9007199254740993")]
        ));
    }

    #[test]
    fn decimal_comparisons() {
        assert!(is_true("a > 1.5", &[("a", "1.75")]));
        assert!(
            is_true("a > 1.5", &[("a", "2")]),
            "integer value vs decimal"
        );
        assert!(is_true("a = 2.0", &[("a", "2")]));
        assert!(is_true("a < 2.5e1", &[("a", "25e-1")]));
        assert!(is_true("a <= -0.5", &[("a", "-0.5")]));
        assert!(is_true("a >= 1E3", &[("a", "1000")]));
        assert_eq!(eval("a > 1.5", &[("a", "NaN")]), Some(false));
        assert_eq!(eval("a > 1.5", &[("a", "inf")]), Some(false));
        assert_eq!(eval("a > 1.5", &[("a", " 2")]), Some(false));
    }

    #[test]
    fn non_numeric_values_make_numeric_predicates_false() {
        let p = [("a", "abc")];
        for expr in [
            "a = 1",
            "a <> 1",
            "a > 1",
            "a < 1",
            "a BETWEEN 1 AND 2",
            "a NOT BETWEEN 1 AND 2",
        ] {
            assert_eq!(eval(expr, &p), Some(false), "{expr}");
        }
        // A decimal value does not convert to an integer literal's type.
        assert_eq!(eval("a > 1", &[("a", "1.5")]), Some(false));
        assert_eq!(eval("a = 1", &[("a", "")]), Some(false));
        // NOT of a FALSE comparison is TRUE.
        assert_eq!(eval("NOT a > 1", &p), Some(true));
    }

    #[test]
    fn literal_on_the_left_is_swapped() {
        let p = [("a", "5")];
        assert!(is_true("4 < a", &p));
        assert!(!is_true("5 < a", &p));
        assert!(is_true("5 <= a", &p));
        assert!(is_true("6 > a", &p));
        assert!(is_true("5 >= a", &p));
        assert!(is_true("5 = a", &p));
        assert!(is_true("'5' = a", &p));
        assert!(is_true("4 <> a", &p));
    }

    #[test]
    fn string_equality() {
        let p = [("s", "it's")];
        assert!(is_true("s = 'it''s'", &p));
        assert!(is_true("s <> 'its'", &p));
        assert!(
            !is_true("s = 'IT''S'", &p),
            "string comparison is case-sensitive"
        );
        assert!(is_true("e = ''", &[("e", "")]));
        assert!(is_true("s = '5'", &[("s", "5")]));
        assert!(!is_true("s = '5'", &[("s", "5.0")]));
        assert!(is_true("u = 'héllo wörld'", &[("u", "héllo wörld")]));
        assert!(is_true("q = ''''", &[("q", "'")]));
    }

    #[test]
    fn string_literal_ordering_is_rejected() {
        for (expr, pos) in [
            ("a > 'x'", 2),
            ("a >= 'x'", 2),
            ("'x' < a", 4),
            ("a <= TRUE", 2),
        ] {
            let e = err(expr);
            assert_eq!(e.position(), Some(pos), "{expr}: {e}");
            assert!(e.to_string().contains("numeric literal"), "{e}");
        }
    }

    #[test]
    fn boolean_comparisons() {
        assert!(is_true("b = TRUE", &[("b", "true")]));
        assert!(is_true("b = true", &[("b", "TRUE")]));
        assert!(is_true("b = FALSE", &[("b", "False")]));
        assert!(is_true("b <> TRUE", &[("b", "false")]));
        assert!(!is_true("b = TRUE", &[("b", "false")]));
        assert_eq!(eval("b = FALSE", &[("b", "yes")]), Some(false));
        assert_eq!(eval("b <> FALSE", &[("b", "1")]), Some(false));
        assert_eq!(eval("b = TRUE", &[]), None);
    }

    #[test]
    fn property_to_property_comparisons() {
        let p = [("a", "10"), ("b", "9"), ("c", "10"), ("s", "x")];
        assert!(is_true("a > b", &p));
        assert!(is_true("b < a", &p));
        assert!(is_true("a = c", &p));
        assert!(is_true("a >= c", &p));
        assert!(is_true("a <> b", &p));
        assert_eq!(eval("a > s", &p), Some(false));
        assert_eq!(eval("a = missing", &p), None);
        assert_eq!(eval("missing <> a", &p), None);
        assert!(
            !is_true("a = d", &[("a", "1"), ("d", "1.0")]),
            "= compares text"
        );
    }

    #[test]
    fn standalone_boolean_literals() {
        assert_eq!(eval("TRUE", &[]), Some(true));
        assert_eq!(eval("false", &[]), Some(false));
        assert_eq!(eval("NOT FALSE", &[]), Some(true));
        assert_eq!(eval("TRUE AND a = 1", &[]), None);
        assert_eq!(eval("FALSE AND a = 1", &[]), Some(false));
    }

    // ----- BETWEEN, IN, IS NULL -------------------------------------------

    #[test]
    fn between() {
        for (v, inside) in [
            ("0", false),
            ("1", true),
            ("2", true),
            ("3", true),
            ("4", false),
        ] {
            let p = [("a", v)];
            assert_eq!(eval("a BETWEEN 1 AND 3", &p), Some(inside), "{v}");
            assert_eq!(eval("a NOT BETWEEN 1 AND 3", &p), Some(!inside), "{v}");
        }
        assert!(is_true("a BETWEEN -3 AND -1", &[("a", "-2")]));
        assert!(is_true("a BETWEEN 2 AND 2", &[("a", "2")]));
        assert!(is_true("a BETWEEN 0.5 AND 1.5", &[("a", "1.25")]));
        assert!(is_true("a BETWEEN 1 AND 1.5", &[("a", "1")]));
        assert!(
            !is_true("a BETWEEN 1 AND 1.5", &[("a", "1.25")]),
            "integer bound"
        );
        assert_eq!(eval("a BETWEEN 1 AND 3", &[]), None);
        assert_eq!(eval("a NOT BETWEEN 1 AND 3", &[]), None);
    }

    #[test]
    fn between_bound_checks() {
        assert_eq!(err_pos("a BETWEEN 3 AND 1"), 10);
        assert_eq!(err_pos("a BETWEEN 1.5 AND 1"), 10);
        assert_eq!(err_pos("a BETWEEN 'x' AND 'y'"), 10);
        assert_eq!(err_pos("a BETWEEN 1 OR 2"), 12);
        assert_eq!(err_pos("a BETWEEN 1"), 11);
        assert_eq!(err_pos("a BETWEEN 1 AND"), 15);
        assert_eq!(err_pos("a BETWEEN NULL AND 1"), 10);
        assert_eq!(err_pos("3 BETWEEN 1 AND 5"), 0);
    }

    #[test]
    fn in_lists() {
        let p = [("a", "y")];
        assert_eq!(eval("a IN ('x', 'y', 'z')", &p), Some(true));
        assert_eq!(eval("a IN ('x')", &p), Some(false));
        assert_eq!(eval("a NOT IN ('x', 'z')", &p), Some(true));
        assert_eq!(eval("a NOT IN ('y')", &p), Some(false));
        assert_eq!(eval("a IN ('x')", &[]), None);
        assert_eq!(eval("a NOT IN ('x')", &[]), None);
        assert!(is_true("a IN ('it''s')", &[("a", "it's")]));
        assert!(is_true("a in('1','2')", &[("a", "2")]));
    }

    #[test]
    fn in_list_errors() {
        assert_eq!(err_pos("a IN ()"), 6);
        assert_eq!(err_pos("a IN ('x',)"), 10);
        assert_eq!(err_pos("a IN (1, 2)"), 6);
        assert_eq!(err_pos("a IN 'x'"), 5);
        assert_eq!(err_pos("a IN ('x' 'y')"), 10);
        assert_eq!(err_pos("a IN ('x'"), 9);
        assert_eq!(err_pos("a IN"), 4);
        assert!(err("a IN ()").to_string().contains("at least one"));
    }

    #[test]
    fn is_null() {
        assert_eq!(eval("a IS NULL", &[]), Some(true));
        assert_eq!(eval("a IS NULL", &[("a", "")]), Some(false));
        assert_eq!(eval("a IS NOT NULL", &[("a", "")]), Some(true));
        assert_eq!(eval("a IS NOT NULL", &[]), Some(false));
        assert_eq!(eval("NOT a IS NULL", &[]), Some(false));
        assert_eq!(err_pos("a IS"), 4);
        assert_eq!(err_pos("a IS NOT"), 8);
        assert_eq!(err_pos("a IS 1"), 5);
        assert_eq!(err_pos("a = NULL"), 4);
        assert_eq!(err_pos("a <> NULL"), 5);
        assert_eq!(err_pos("NULL IS NULL"), 0);
    }

    // ----- string operators -------------------------------------------------

    #[test]
    fn like_wildcards() {
        let cases = [
            ("abc", "abc", true),
            ("abc", "ab", false),
            ("abc", "a%", true),
            ("abc", "%c", true),
            ("abc", "%b%", true),
            ("abc", "%", true),
            ("", "%", true),
            ("", "_", false),
            ("", "", true),
            ("abc", "", false),
            ("abc", "a_c", true),
            ("abc", "a__", true),
            ("abc", "a___", false),
            ("abc", "_%_", true),
            ("a", "_%_", false),
            ("aXbXc", "a%b%c", true),
            ("aXbXd", "a%b%c", false),
            ("mississippi", "%iss%ppi", true),
            ("mississippi", "m%ss%ss%", true),
            ("ünï", "_n_", true),
            ("ünï", "ü%", true),
            ("ABC", "abc", false),
            ("ab%", "ab%%", true),
        ];
        for (value, pattern, want) in cases {
            let expr = format!("v LIKE '{pattern}'");
            assert_eq!(
                eval(&expr, &[("v", value)]),
                Some(want),
                "{value:?} LIKE {pattern:?}"
            );
            let expr = format!("v NOT LIKE '{pattern}'");
            assert_eq!(
                eval(&expr, &[("v", value)]),
                Some(!want),
                "{value:?} NOT LIKE {pattern:?}"
            );
        }
        assert_eq!(eval("v LIKE 'a%'", &[]), None);
        assert_eq!(eval("v NOT LIKE 'a%'", &[]), None);
    }

    #[test]
    fn like_escape() {
        assert!(is_true(r"v LIKE '50\%' ESCAPE '\'", &[("v", "50%")]));
        assert!(!is_true(r"v LIKE '50\%' ESCAPE '\'", &[("v", "500")]));
        assert!(is_true("v LIKE 'a!_b' ESCAPE '!'", &[("v", "a_b")]));
        assert!(!is_true("v LIKE 'a!_b' ESCAPE '!'", &[("v", "axb")]));
        assert!(is_true("v LIKE 'a!!b' escape '!'", &[("v", "a!b")]));
        assert_eq!(err_pos(r"v LIKE 'x\' ESCAPE '\'"), 7);
        assert_eq!(err_pos("v LIKE 'x' ESCAPE 'ab'"), 18);
        assert_eq!(err_pos("v LIKE 'x' ESCAPE ''"), 18);
        assert_eq!(err_pos("v LIKE 'x' ESCAPE"), 17);
        assert_eq!(err_pos("v LIKE x"), 7);
    }

    #[test]
    fn like_is_not_exponential() {
        let value = "a".repeat(4000);
        let pattern = format!("{}b", "%a".repeat(1000));
        let expr = SqlExpr::parse(&format!("v LIKE '{pattern}'")).expect("valid");
        assert!(!expr.matches(&TestMessage::with_props(&[("v", value.as_str())])));
    }

    #[test]
    fn contains_starts_ends() {
        let p = [("s", "hello world")];
        let cases = [
            ("s CONTAINS 'lo w'", true),
            ("s CONTAINS 'xyz'", false),
            ("s NOT CONTAINS 'xyz'", true),
            ("s NOT CONTAINS 'hello'", false),
            ("s STARTSWITH 'hell'", true),
            ("s STARTSWITH 'world'", false),
            ("s NOT STARTSWITH 'world'", true),
            ("s NOT STARTSWITH 'h'", false),
            ("s ENDSWITH 'world'", true),
            ("s ENDSWITH 'hello'", false),
            ("s NOT ENDSWITH 'hello'", true),
            ("s NOT ENDSWITH 'd'", false),
            (
                "s contains 'o' and s startsWith 'h' and s EndsWith 'd'",
                true,
            ),
            // Empty search strings never match (as in RocketMQ).
            ("s CONTAINS ''", false),
            ("s NOT CONTAINS ''", false),
            ("s STARTSWITH ''", false),
            ("s NOT ENDSWITH ''", false),
        ];
        for (expr, want) in cases {
            assert_eq!(eval(expr, &p), Some(want), "{expr}");
        }
        for expr in [
            "s CONTAINS 'x'",
            "s NOT CONTAINS 'x'",
            "s STARTSWITH 'x'",
            "s ENDSWITH 'x'",
        ] {
            assert_eq!(eval(expr, &[]), None, "{expr}");
        }
        assert_eq!(err_pos("s CONTAINS 1"), 11);
        assert_eq!(err_pos("s STARTSWITH"), 12);
        assert_eq!(err_pos("'x' ENDSWITH 'x'"), 0);
    }

    // ----- logic ------------------------------------------------------------

    #[test]
    fn precedence_and_binds_tighter_than_or() {
        let expr = "a = 1 OR b = 2 AND c = 3";
        assert!(is_true(expr, &[("a", "1"), ("b", "0"), ("c", "0")]));
        assert!(!is_true(expr, &[("a", "0"), ("b", "2"), ("c", "0")]));
        assert!(is_true(expr, &[("a", "0"), ("b", "2"), ("c", "3")]));
        let expr = "(a = 1 OR b = 2) AND c = 3";
        assert!(!is_true(expr, &[("a", "1"), ("b", "0"), ("c", "0")]));
        assert!(is_true(expr, &[("a", "1"), ("b", "0"), ("c", "3")]));
        let expr = "a = 1 AND b = 2 OR c = 3";
        assert!(is_true(expr, &[("a", "0"), ("b", "0"), ("c", "3")]));
    }

    #[test]
    fn not_binds_tighter_than_and() {
        let expr = "NOT a = 1 AND b = 2";
        assert!(is_true(expr, &[("a", "0"), ("b", "2")]));
        assert!(!is_true(expr, &[("a", "1"), ("b", "2")]));
        assert!(!is_true(expr, &[("a", "0"), ("b", "0")]));
        let expr = "NOT (a = 1 AND b = 2)";
        assert!(is_true(expr, &[("a", "0"), ("b", "2")]));
        assert!(is_true(expr, &[("a", "1"), ("b", "0")]));
        assert!(!is_true(expr, &[("a", "1"), ("b", "2")]));
        assert!(is_true("NOT NOT a = 1", &[("a", "1")]));
    }

    #[test]
    fn missing_properties_are_unknown() {
        for expr in [
            "a = 1",
            "a <> 1",
            "a > 1",
            "a = 'x'",
            "a <> 'x'",
            "NOT a > 1",
            "NOT (a = 'x')",
            "NOT NOT a = 1",
            "a > 1 OR a <= 1",
            "a > 1 AND TRUE",
        ] {
            assert_eq!(eval(expr, &[]), None, "{expr}");
            assert!(!parse(expr).matches(&TestMessage::default()), "{expr}");
        }
    }

    #[test]
    fn three_valued_and_or() {
        let p = [("b", "2")];
        assert_eq!(eval("a = 1 OR b = 2", &p), Some(true));
        assert_eq!(eval("a = 1 OR b = 3", &p), None);
        assert_eq!(eval("a = 1 AND b = 3", &p), Some(false));
        assert_eq!(eval("a = 1 AND b = 2", &p), None);
        assert_eq!(eval("NOT (a = 1 AND b = 3)", &p), Some(true));
        assert_eq!(eval("NOT (a = 1 OR b = 3)", &p), None);
        assert_eq!(eval("a IS NULL OR a > 3", &p), Some(true));
        assert_eq!(eval("a IS NOT NULL AND a > 3", &p), Some(false));
    }

    #[test]
    fn tags_property() {
        let mut m = TestMessage::with_tag("TagA");
        assert!(parse("TAGS = 'TagA'").matches(&m));
        assert!(parse("TAGS IS NOT NULL AND TAGS IN ('TagA','TagB')").matches(&m));
        assert!(!parse("TAGS = 'TagB'").matches(&m));
        assert!(
            !parse("tags = 'TagA'").matches(&m),
            "property names are case-sensitive"
        );
        m.props.push(("TAGS".into(), "Explicit".into()));
        assert!(
            parse("TAGS = 'Explicit'").matches(&m),
            "a TAGS property wins"
        );
        assert!(parse("TAGS IS NULL").matches(&TestMessage::default()));
    }

    #[test]
    fn keywords_are_case_insensitive() {
        let p = [("a", "2"), ("b", "x"), ("c", "true")];
        for expr in [
            "a between 1 and 3 aNd b iS nOt NuLl",
            "a Not Between 5 AnD 6 oR a > 10",
            "b In ('x') AND NOT b not in ('x') or FALSE",
            "b like 'x' and b Not Like 'y' and c = True",
            "b contains 'x' AND b startswith 'x' AND b ENDSWITH 'x'",
            "a is not null and not (a is null)",
        ] {
            assert_eq!(eval(expr, &p), Some(true), "{expr}");
        }
    }

    #[test]
    fn identifiers() {
        let p = [
            ("a.b", "1"),
            ("_x", "2"),
            ("$y", "3"),
            ("k9", "4"),
            ("ANDROID", "5"),
            ("nothing", "6"),
            ("A", "7"),
        ];
        assert!(is_true("a.b = 1 AND _x = 2 AND $y = 3 AND k9 = 4", &p));
        assert!(is_true("ANDROID = 5 AND nothing = 6", &p));
        assert!(is_true("A = 7", &p));
        assert_eq!(eval("a = 7", &p), None);
    }

    #[test]
    fn whitespace_is_flexible() {
        assert!(is_true("\t( a=1 )\n", &[("a", "1")]));
        assert!(is_true("(a=1)AND(b='x')", &[("a", "1"), ("b", "x")]));
        assert!(is_true("a IN('x')", &[("a", "x")]));
    }

    #[test]
    fn long_flat_chains_are_fine() {
        let terms: Vec<String> = (0..300).map(|i| format!("a<>{i}")).collect();
        let expr = terms.join(" AND ");
        assert!(expr.len() <= MAX_SQL_LEN);
        assert!(is_true(&expr, &[("a", "1000")]));
        assert!(!is_true(&expr, &[("a", "7")]));
        let expr = terms.join(" OR ");
        assert!(is_true(&expr, &[("a", "7")]));
    }

    // ----- malformed input and limits -----------------------------------------

    #[test]
    fn malformed_expressions_report_positions() {
        let cases: &[(&str, usize)] = &[
            ("", 0),
            ("   ", 3),
            ("(a = 1", 6),
            ("((a = 1)", 8),
            ("a = 1)", 5),
            ("(a = 1))", 7),
            ("()", 1),
            ("a = 1 b", 6),
            ("a = 1 AND", 9),
            ("a = 1 OR OR b = 1", 9),
            ("AND a = 1", 0),
            ("a = 'abc", 4),
            ("a = 'it''s", 4),
            ("a >", 3),
            ("a > > 1", 4),
            ("a == 1", 3),
            ("a", 1),
            ("a b", 2),
            ("NOT", 3),
            ("a NOT = 1", 6),
            ("1 = 1", 0),
            ("'x' = 'y'", 0),
            ("a = 99999999999999999999", 4),
            ("a = 1e999", 4),
            ("a = 12abc", 6),
            ("a = 1.2.3", 7),
            ("a = 1.", 5),
            ("a = - 1", 4),
            ("a # 1", 2),
            ("a = \"x\"", 4),
            ("a ! 1", 2),
            ("a = 1 ; b = 2", 6),
            ("é = 1", 0),
            ("a = 1 AND é", 10),
            ("a = ,", 4),
        ];
        for &(expr, pos) in cases {
            let e = err(expr);
            assert_eq!(e.position(), Some(pos), "{expr:?}: {e}");
            assert!(e.to_string().contains(&format!("position {pos}")), "{e}");
        }
    }

    #[test]
    fn error_messages_are_descriptive() {
        let msg = err("(a = 1").to_string();
        assert!(msg.contains("')'") && msg.contains("end of input"), "{msg}");
        let msg = err("a = 'abc").to_string();
        assert!(msg.contains("unterminated string"), "{msg}");
        let msg = err("a = 1 b").to_string();
        assert!(msg.contains("'b'"), "{msg}");
        let msg = err("a = 1)").to_string();
        assert!(msg.contains("unbalanced"), "{msg}");
        let long_ident = "x".repeat(100);
        let msg = err(&format!("a = 1 {long_ident}")).to_string();
        assert!(msg.len() < 200, "long tokens are shortened: {msg}");
    }

    #[test]
    fn length_limit() {
        let padded = format!("a = 1{}", " ".repeat(MAX_SQL_LEN - 5));
        assert_eq!(padded.len(), MAX_SQL_LEN);
        assert!(SqlExpr::parse(&padded).is_ok());
        let too_long = format!("{padded} ");
        assert_eq!(
            err(&too_long),
            FilterError::TooLong {
                len: MAX_SQL_LEN + 1,
                max: MAX_SQL_LEN
            }
        );
    }

    #[test]
    fn depth_limit_parentheses() {
        let nested = |n: usize| format!("{}a = 1{}", "(".repeat(n), ")".repeat(n));
        assert!(is_true(&nested(MAX_SQL_DEPTH), &[("a", "1")]));
        assert_eq!(
            err(&nested(MAX_SQL_DEPTH + 1)),
            FilterError::TooDeep {
                position: MAX_SQL_DEPTH,
                max: MAX_SQL_DEPTH
            }
        );
        // Far deeper than the limit, within the length limit: no stack overflow.
        assert!(matches!(
            err(&"(".repeat(4000)),
            FilterError::TooDeep { .. }
        ));
        assert!(matches!(err(&nested(2000)), FilterError::TooDeep { .. }));
    }

    #[test]
    fn depth_limit_not() {
        let nots = |n: usize| format!("{}a = 1", "NOT ".repeat(n));
        assert_eq!(eval(&nots(MAX_SQL_DEPTH), &[("a", "1")]), Some(true));
        assert_eq!(
            err(&nots(MAX_SQL_DEPTH + 1)),
            FilterError::TooDeep {
                position: 4 * MAX_SQL_DEPTH,
                max: MAX_SQL_DEPTH
            }
        );
        assert!(matches!(
            err(&"NOT ".repeat(1000)),
            FilterError::TooDeep { .. }
        ));
        // Parentheses and NOT share the budget.
        let mixed = "NOT (".repeat(40) + "a = 1" + &")".repeat(40);
        assert!(matches!(err(&mixed), FilterError::TooDeep { .. }));
    }

    #[test]
    fn source_and_display() {
        let e = parse(" a = 1 ");
        assert_eq!(e.source(), " a = 1 ");
        assert_eq!(e.to_string(), " a = 1 ");
    }

    // ----- property tests ---------------------------------------------------

    fn sample_messages() -> Vec<TestMessage> {
        let mut tagged = TestMessage::with_props(&[("a", "1"), ("b", "x"), ("c", "-2.5")]);
        tagged.tag = Some("TagA".into());
        vec![
            TestMessage::default(),
            tagged,
            TestMessage::with_props(&[("a", ""), ("b", "true"), ("a.b", "%_'")]),
            TestMessage::with_props(&[("a", "9223372036854775807"), ("b", "1e308")]),
        ]
    }

    fn sqlish_fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("TAGS".to_owned()),
            Just("(".to_owned()),
            Just(")".to_owned()),
            Just(",".to_owned()),
            Just("=".to_owned()),
            Just("<>".to_owned()),
            Just(">=".to_owned()),
            Just("<".to_owned()),
            Just("AND".to_owned()),
            Just("OR".to_owned()),
            Just("NOT".to_owned()),
            Just("BETWEEN".to_owned()),
            Just("IN".to_owned()),
            Just("IS".to_owned()),
            Just("NULL".to_owned()),
            Just("LIKE".to_owned()),
            Just("ESCAPE".to_owned()),
            Just("CONTAINS".to_owned()),
            Just("TRUE".to_owned()),
            Just("'x'".to_owned()),
            Just("'%_'".to_owned()),
            Just("'".to_owned()),
            Just("-".to_owned()),
            any::<i64>().prop_map(|v| v.to_string()),
            any::<f64>().prop_map(|v| v.to_string()),
            "[-a-z0-9.$_'%()<>=!, ]{1,4}",
        ]
    }

    fn sqlish() -> impl Strategy<Value = String> {
        prop::collection::vec(sqlish_fragment(), 0..24).prop_map(|parts| parts.join(" "))
    }

    fn check_no_panic(input: &str) {
        if let Ok(expr) = SqlExpr::parse(input) {
            for m in sample_messages() {
                let _ = expr.evaluate(&m);
            }
        }
    }

    proptest! {
        #[test]
        fn arbitrary_strings_never_panic(input in any::<String>()) {
            check_no_panic(&input);
        }

        #[test]
        fn sql_like_strings_never_panic(input in sqlish()) {
            check_no_panic(&input);
        }
    }

    /// A tiny expression language over two optional integer properties with a
    /// direct three-valued Rust model.
    #[derive(Debug, Clone)]
    enum Model {
        Cmp(bool, CmpOp, i64),
        Between(bool, i64, i64, bool),
        In(bool, Vec<i64>, bool),
        IsNull(bool, bool),
        Not(Box<Model>),
        And(Box<Model>, Box<Model>),
        Or(Box<Model>, Box<Model>),
    }

    fn var(is_a: bool) -> &'static str {
        if is_a { "a" } else { "b" }
    }

    impl Model {
        fn precedence(&self) -> u8 {
            match self {
                Model::Or(..) => 1,
                Model::And(..) => 2,
                Model::Not(_) => 3,
                _ => 4,
            }
        }

        /// Renders with the fewest parentheses the grammar needs.
        fn render(&self, out: &mut String) {
            let child = |m: &Model, min: u8, out: &mut String| {
                if m.precedence() < min {
                    out.push('(');
                    m.render(out);
                    out.push(')');
                } else {
                    m.render(out);
                }
            };
            match self {
                Model::Cmp(v, op, n) => {
                    out.push_str(&format!("{} {} {n}", var(*v), op.symbol()));
                }
                Model::Between(v, lo, hi, neg) => {
                    let not = if *neg { "NOT " } else { "" };
                    out.push_str(&format!("{} {not}BETWEEN {lo} AND {hi}", var(*v)));
                }
                Model::In(v, items, neg) => {
                    let not = if *neg { "NOT " } else { "" };
                    let list: Vec<String> = items.iter().map(|i| format!("'{i}'")).collect();
                    out.push_str(&format!("{} {not}IN ({})", var(*v), list.join(", ")));
                }
                Model::IsNull(v, neg) => {
                    let not = if *neg { "NOT " } else { "" };
                    out.push_str(&format!("{} IS {not}NULL", var(*v)));
                }
                Model::Not(inner) => {
                    out.push_str("NOT ");
                    child(inner, 3, out);
                }
                Model::And(l, r) => {
                    child(l, 2, out);
                    out.push_str(" AND ");
                    child(r, 2, out);
                }
                Model::Or(l, r) => {
                    child(l, 1, out);
                    out.push_str(" OR ");
                    child(r, 1, out);
                }
            }
        }

        fn eval(&self, a: Option<i64>, b: Option<i64>) -> Option<bool> {
            let get = |v: bool| if v { a } else { b };
            match self {
                Model::Cmp(v, op, n) => get(*v).map(|x| op.holds(x.cmp(n))),
                Model::Between(v, lo, hi, neg) => get(*v).map(|x| (*lo <= x && x <= *hi) != *neg),
                Model::In(v, items, neg) => get(*v).map(|x| items.contains(&x) != *neg),
                Model::IsNull(v, neg) => Some(get(*v).is_none() != *neg),
                Model::Not(inner) => inner.eval(a, b).map(|x| !x),
                Model::And(l, r) => match (l.eval(a, b), r.eval(a, b)) {
                    (Some(false), _) | (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                },
                Model::Or(l, r) => match (l.eval(a, b), r.eval(a, b)) {
                    (Some(true), _) | (_, Some(true)) => Some(true),
                    (Some(false), Some(false)) => Some(false),
                    _ => None,
                },
            }
        }
    }

    fn model() -> impl Strategy<Value = Model> {
        let small = -4i64..=4;
        let op = prop_oneof![
            Just(CmpOp::Eq),
            Just(CmpOp::Ne),
            Just(CmpOp::Gt),
            Just(CmpOp::Ge),
            Just(CmpOp::Lt),
            Just(CmpOp::Le),
        ];
        let leaf = prop_oneof![
            (any::<bool>(), op, small.clone()).prop_map(|(v, op, n)| Model::Cmp(v, op, n)),
            (any::<bool>(), small.clone(), small.clone(), any::<bool>())
                .prop_map(|(v, x, y, neg)| Model::Between(v, x.min(y), x.max(y), neg)),
            (
                any::<bool>(),
                prop::collection::vec(small, 1..4),
                any::<bool>()
            )
                .prop_map(|(v, items, neg)| Model::In(v, items, neg)),
            (any::<bool>(), any::<bool>()).prop_map(|(v, neg)| Model::IsNull(v, neg)),
        ];
        leaf.prop_recursive(5, 48, 2, |inner| {
            prop_oneof![
                inner.clone().prop_map(|m| Model::Not(Box::new(m))),
                (inner.clone(), inner.clone())
                    .prop_map(|(l, r)| Model::And(Box::new(l), Box::new(r))),
                (inner.clone(), inner).prop_map(|(l, r)| Model::Or(Box::new(l), Box::new(r))),
            ]
        })
    }

    proptest! {
        #[test]
        fn evaluation_agrees_with_model(
            m in model(),
            a in prop::option::of(-5i64..=5),
            b in prop::option::of(-5i64..=5),
        ) {
            let mut text = String::new();
            m.render(&mut text);
            let expr = SqlExpr::parse(&text)
                .map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
            let a_text = a.map(|v| v.to_string());
            let b_text = b.map(|v| v.to_string());
            let mut props = Vec::new();
            if let Some(v) = &a_text {
                props.push(("a", v.as_str()));
            }
            if let Some(v) = &b_text {
                props.push(("b", v.as_str()));
            }
            let msg = TestMessage::with_props(&props);
            prop_assert_eq!(expr.evaluate(&msg), m.eval(a, b), "{}", text);
        }
    }
}
