//! Validation of topic and group names.
//!
//! Names end up in file paths (consume-queue directories), so they are restricted to
//! `[A-Za-z0-9_%|-]` and at most 127 bytes, the character set RocketMQ accepts.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is {0} bytes long; at most 127 are allowed")]
    TooLong(usize),
    #[error("name contains {0:?}; only letters, digits, '_', '-', '%' and '|' are allowed")]
    BadChar(char),
}

/// Checks a topic or consumer-group name.
pub fn validate_resource_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > 127 {
        return Err(NameError::TooLong(name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '%' | '|')))
    {
        return Err(NameError::BadChar(c));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects() {
        assert!(validate_resource_name("orders_v2-%DLQ|x").is_ok());
        assert_eq!(validate_resource_name(""), Err(NameError::Empty));
        assert_eq!(
            validate_resource_name("../etc"),
            Err(NameError::BadChar('.'))
        );
        assert_eq!(validate_resource_name("a/b"), Err(NameError::BadChar('/')));
        assert_eq!(
            validate_resource_name(&"a".repeat(128)),
            Err(NameError::TooLong(128))
        );
    }
}
