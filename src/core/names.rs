//! Validated names and texts: a `Nick`, a `RoomName` or a `Text` that exists is
//! valid, so nothing past the parser checks them again.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use super::event::ErrorCode;

/// Why a piece of user input was refused: the `error` event a client receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The protocol's error code.
    pub code: ErrorCode,
    /// A sentence for a person, saying what to do instead.
    pub message: String,
}

impl Refusal {
    /// A refusal with `code` and a human `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// Longest nick, in bytes (nicks are ASCII).
pub const MAX_NICK: usize = 32;
/// Longest room name, in bytes, without the optional leading `#`.
pub const MAX_ROOM: usize = 64;

/// A nick: `[A-Za-z0-9_-]{1,32}`. Shown as typed, compared case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Nick(String);

impl Nick {
    /// Checks `s` against the protocol's nick grammar.
    pub fn parse(s: &str) -> Result<Nick, Refusal> {
        let ok = (1..=MAX_NICK).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Nick(s.to_owned()))
        } else {
            Err(Refusal::new(
                ErrorCode::InvalidNick,
                "a nick is 1 to 32 of A-Z a-z 0-9 _ -",
            ))
        }
    }

    /// The case-folded form under which uniqueness is decided.
    pub fn key(&self) -> NickKey {
        NickKey(self.0.to_ascii_lowercase())
    }

    /// The nick as the user typed it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Nick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest `Idempotency-Key`, in characters.
pub const MAX_IDEMPOTENCY_KEY: usize = 64;

/// The client's name for one send (`Idempotency-Key` on `POST /message`): a
/// retry under the same key, by the same nick, within the store's window is
/// answered with the first send's receipt and sends nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// 1 to 64 visible ASCII characters (a UUID fits; spaces and control
    /// characters do not, so a key always survives an HTTP header as sent).
    pub fn parse(s: &str) -> Result<IdempotencyKey, Refusal> {
        let ok =
            (1..=MAX_IDEMPOTENCY_KEY).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(IdempotencyKey(s.to_owned()))
        } else {
            Err(Refusal::new(
                ErrorCode::BadArguments,
                "Idempotency-Key must be 1 to 64 visible ASCII characters (a UUID is a good key)",
            ))
        }
    }

    /// The key as sent.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A nick folded to lower case: two nicks with the same key are the same user.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NickKey(String);

impl NickKey {
    /// The folded nick.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A room name: `[a-z0-9][a-z0-9_-]{0,63}`, stored without `#`.
///
/// Shared, not copied: every message, membership and remembered frame names
/// its room, and a clone is a reference count instead of an allocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

impl Serialize for RoomName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl RoomName {
    /// Accepts a leading `#` and folds upper case, as the protocol says.
    pub fn parse(s: &str) -> Result<RoomName, Refusal> {
        let name = s.strip_prefix('#').unwrap_or(s).to_ascii_lowercase();
        let bytes = name.as_bytes();
        let ok = (1..=MAX_ROOM).contains(&bytes.len())
            && bytes[0].is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if ok {
            Ok(RoomName(name.into()))
        } else {
            Err(Refusal::new(
                ErrorCode::InvalidRoom,
                "a room is 1 to 64 of a-z 0-9 _ -, starting with a letter or digit",
            ))
        }
    }

    /// The name without `#`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message text: 1 to `max` characters, not all of them white space, no
/// control characters but tab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(String);

impl Text {
    /// Checks length (in characters, not bytes) and content.
    pub fn parse(s: &str, max_chars: usize) -> Result<Text, Refusal> {
        // Blank text would arrive as an empty-looking line from nowhere.
        if s.trim().is_empty() {
            return Err(Refusal::new(ErrorCode::BadArguments, "the text is empty"));
        }
        let chars = s.chars().count();
        if chars > max_chars {
            return Err(Refusal::new(
                ErrorCode::TooLong,
                format!("the text is {chars} characters; the limit is {max_chars}"),
            ));
        }
        if s.chars().any(|c| c.is_control() && c != '\t') {
            return Err(Refusal::new(
                ErrorCode::BadArguments,
                "the text may not contain control characters (tab is fine)",
            ));
        }
        if s.chars().any(is_bidi_override) {
            return Err(Refusal::new(
                ErrorCode::BadArguments,
                "the text may not contain bidirectional overrides or isolates \
                 (U+202A-202E, U+2066-2069): they can make a line look like someone else's",
            ));
        }
        Ok(Text(s.to_owned()))
    }

    /// The text itself.
    pub fn into_string(self) -> String {
        self.0
    }

    /// The text itself.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The embedding, override and isolate controls of Unicode's bidirectional
/// algorithm. In a terminal they reorder the rest of the line, so a message
/// could show `<alice>` where it says `<mallory>`. (Nicks and rooms are ASCII
/// and cannot hold them.)
fn is_bidi_override(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_refuse_bidi_overrides_and_isolates_but_not_other_scripts() {
        for c in ['\u{202A}', '\u{202E}', '\u{2066}', '\u{2069}'] {
            let e = Text::parse(&format!("hi {c}olleh"), 100).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadArguments);
        }
        assert!(Text::parse("שלום مرحبا", 100).is_ok());
        // Only the ranges: their neighbours are not refused for this reason.
        assert!(Text::parse("\u{2029}\u{202F}\u{2065}\u{206A}", 100).is_ok());
        assert!(Nick::parse("a\u{202E}").is_err());
        assert!(RoomName::parse("a\u{2066}").is_err());
    }

    #[test]
    fn idempotency_keys_are_1_to_64_visible_ascii() {
        assert!(IdempotencyKey::parse("0b9f6a1e-7d2c-4c47-9a53-5f0f2a1d9e11").is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(64)).is_ok());
        for bad in ["", "has space", "tab\t", "é"] {
            let refusal = IdempotencyKey::parse(bad).expect_err(bad);
            assert_eq!(refusal.code, ErrorCode::BadArguments);
        }
        assert!(IdempotencyKey::parse(&"k".repeat(65)).is_err());
    }

    #[test]
    fn nicks_follow_the_grammar_and_fold_case() {
        assert!(Nick::parse("alice_-9").is_ok());
        assert!(Nick::parse("").is_err());
        assert!(Nick::parse("a b").is_err());
        assert!(Nick::parse("é").is_err());
        assert!(Nick::parse(&"a".repeat(32)).is_ok());
        assert!(Nick::parse(&"a".repeat(33)).is_err());
        assert_eq!(
            Nick::parse("Alice").unwrap().key(),
            Nick::parse("aLICE").unwrap().key()
        );
        assert_eq!(Nick::parse("Alice").unwrap().as_str(), "Alice");
    }

    #[test]
    fn rooms_drop_hash_and_fold_case() {
        assert_eq!(RoomName::parse("#General").unwrap().as_str(), "general");
        assert!(RoomName::parse("_x").is_err());
        assert!(RoomName::parse("#").is_err());
        assert!(RoomName::parse("a.b").is_err());
        assert!(RoomName::parse(&"r".repeat(64)).is_ok());
        assert!(RoomName::parse(&"r".repeat(65)).is_err());
    }

    #[test]
    fn text_counts_characters_not_bytes() {
        assert!(Text::parse(&"é".repeat(2000), 2000).is_ok());
        let err = Text::parse(&"é".repeat(2001), 2000).unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLong);
        assert!(Text::parse("tab\tok", 10).is_ok());
        assert_eq!(
            Text::parse("bell\x07", 10).unwrap_err().code,
            ErrorCode::BadArguments
        );
        assert_eq!(
            Text::parse("", 10).unwrap_err().code,
            ErrorCode::BadArguments
        );
        assert_eq!(
            Text::parse(" \t\u{a0} ", 10).unwrap_err().code,
            ErrorCode::BadArguments
        );
        assert!(Text::parse(" x ", 10).is_ok());
    }
}
