//! The slash-command parser: a pure function from one line to a [`Command`].
//!
//! The same parser reads TCP lines and HTTP `POST /command` bodies. It does no I/O
//! and knows nothing about who sent the line; the [`Hub`](super::Hub) applies the
//! result.
//!
//! ```text
//! hello             say "hello" in the current room
//! //etc/passwd      say "/etc/passwd" (a leading // escapes one /)
//! /nick NAME        /join ROOM [SEQ]  /leave [ROOM]     /switch ROOM
//! /rooms            /who [ROOM]       /msg NICK TEXT    /me TEXT
//! /history [N]      /format text|json /help             /quit
//! ```

use super::event::{ErrorCode, Format, HelpLine};
use super::names::{Nick, Refusal, RoomName, Text};

/// Most messages `/history` returns.
pub const MAX_HISTORY: u16 = 100;
/// Messages `/history` returns when no count is given.
pub const DEFAULT_HISTORY: u16 = 10;

/// One thing a user asked for, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A plain line: a message to the current room.
    Say(Text),
    /// `/me TEXT`: an action in the current room.
    Me(Text),
    /// `/nick NAME`.
    Nick(Nick),
    /// `/join ROOM [SEQ]`: join, then replay the room's last messages or,
    /// with `after`, every message after that seq (a client's own cursor).
    Join {
        /// The room to join.
        room: RoomName,
        /// Resume after this seq instead of replaying the last ten.
        after: Option<u64>,
    },
    /// `/leave [ROOM]`; `None` is the current room.
    Leave(Option<RoomName>),
    /// `/switch ROOM`.
    Switch(RoomName),
    /// `/rooms`.
    Rooms,
    /// `/who [ROOM]`; `None` is the current room.
    Who(Option<RoomName>),
    /// `/msg NICK TEXT`.
    Msg { to: Nick, text: Text },
    /// `/history [N]`, N in 1..=100.
    History(u16),
    /// `/format text|json`.
    Format(Format),
    /// `/help`.
    Help,
    /// `/quit`.
    Quit,
}

impl Command {
    /// Whether every member of the caller's rooms hears of it (`/nick`,
    /// `/join`, `/leave`): those are rate-limited like messages, or one client
    /// could flood a room with presence events it never has to type.
    pub fn reaches_others(&self) -> bool {
        matches!(
            self,
            Command::Nick(..) | Command::Join { .. } | Command::Leave(..)
        )
    }
}

/// Every command, for `/help` (and the README).
pub const HELP: &[HelpLine] = &[
    HelpLine {
        usage: "/nick NAME",
        help: "change your nick",
    },
    HelpLine {
        usage: "/join ROOM [SEQ]",
        help: "join a room (created if new) and make it current; with SEQ, replay every message after it",
    },
    HelpLine {
        usage: "/leave [ROOM]",
        help: "leave a room (default: the current one)",
    },
    HelpLine {
        usage: "/switch ROOM",
        help: "make a joined room current",
    },
    HelpLine {
        usage: "/rooms",
        help: "list rooms that have members",
    },
    HelpLine {
        usage: "/who [ROOM]",
        help: "list a room's members",
    },
    HelpLine {
        usage: "/msg NICK TEXT",
        help: "send a direct message",
    },
    HelpLine {
        usage: "/me TEXT",
        help: "act in the current room",
    },
    HelpLine {
        usage: "/history [N]",
        help: "last N (max 100) messages of the current room",
    },
    HelpLine {
        usage: "/format text|json",
        help: "choose how this connection renders events",
    },
    HelpLine {
        usage: "/help",
        help: "this list",
    },
    HelpLine {
        usage: "/quit",
        help: "leave",
    },
    HelpLine {
        usage: "//TEXT",
        help: "say a line that starts with /",
    },
];

/// Parses one line (without its line ending).
///
/// `Ok(None)` is an empty line, which the protocol ignores. `max_text` is the
/// longest message text in characters (`--max-text`).
pub fn parse(line: &str, max_text: usize) -> Result<Option<Command>, Refusal> {
    if line.is_empty() {
        return Ok(None);
    }
    let Some(rest) = line.strip_prefix('/') else {
        return Text::parse(line, max_text).map(|t| Some(Command::Say(t)));
    };
    if rest.starts_with('/') {
        return Text::parse(rest, max_text).map(|t| Some(Command::Say(t)));
    }
    let (name, args) = match rest.split_once(' ') {
        Some((name, args)) => (name, args.trim_start_matches(' ')),
        None => (rest, ""),
    };
    let command = match name.to_ascii_lowercase().as_str() {
        "nick" => Command::Nick(Nick::parse(one(args, "/nick NAME")?)?),
        "join" => join(args)?,
        "leave" => Command::Leave(
            optional(args, "/leave [ROOM]")?
                .map(RoomName::parse)
                .transpose()?,
        ),
        "switch" => Command::Switch(RoomName::parse(one(args, "/switch ROOM")?)?),
        "rooms" => none(args, "/rooms", Command::Rooms)?,
        "who" => Command::Who(
            optional(args, "/who [ROOM]")?
                .map(RoomName::parse)
                .transpose()?,
        ),
        "msg" => {
            let usage = "/msg NICK TEXT";
            let (to, text) = args.split_once(' ').unwrap_or((args, ""));
            let text = text.trim_start_matches(' ');
            if to.is_empty() || text.is_empty() {
                return Err(bad(usage));
            }
            Command::Msg {
                to: Nick::parse(to)?,
                text: Text::parse(text, max_text)?,
            }
        }
        "me" => {
            if args.is_empty() {
                return Err(bad("/me TEXT"));
            }
            Command::Me(Text::parse(args, max_text)?)
        }
        "history" => match optional(args, "/history [N]")? {
            None => Command::History(DEFAULT_HISTORY),
            Some(n) => match n.parse::<u16>() {
                Ok(n) if (1..=MAX_HISTORY).contains(&n) => Command::History(n),
                _ => return Err(bad("/history [N] with N from 1 to 100")),
            },
        },
        "format" => match one(args, "/format text|json")? {
            "text" => Command::Format(Format::Text),
            "json" => Command::Format(Format::Json),
            _ => return Err(bad("/format text|json")),
        },
        "help" => Command::Help,
        "quit" => Command::Quit,
        _ => return Err(unknown(name)),
    };
    Ok(Some(command))
}

/// `/join ROOM [SEQ]`: a seq is a whole number (0 replays from the start).
fn join(args: &str) -> Result<Command, Refusal> {
    let usage = "/join ROOM [SEQ]";
    let mut words = args.split(' ').filter(|w| !w.is_empty());
    let (Some(room), seq, None) = (words.next(), words.next(), words.next()) else {
        return Err(bad(usage));
    };
    let after = match seq {
        None => None,
        Some(seq) => Some(
            seq.parse::<u64>()
                .map_err(|_| bad("/join ROOM [SEQ] with SEQ a whole number"))?,
        ),
    };
    Ok(Command::Join {
        room: RoomName::parse(room)?,
        after,
    })
}

fn bad(usage: &str) -> Refusal {
    Refusal::new(ErrorCode::BadArguments, format!("usage: {usage}"))
}

/// Names only what is safe to echo: raw input never goes back unescaped.
fn unknown(name: &str) -> Refusal {
    let printable = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let message = if printable {
        format!("unknown command /{name}; /help lists the commands")
    } else {
        "unknown command; /help lists the commands".to_owned()
    };
    Refusal::new(ErrorCode::UnknownCommand, message)
}

/// Exactly one word.
fn one<'a>(args: &'a str, usage: &str) -> Result<&'a str, Refusal> {
    optional(args, usage)?.ok_or_else(|| bad(usage))
}

/// Zero or one word.
fn optional<'a>(args: &'a str, usage: &str) -> Result<Option<&'a str>, Refusal> {
    let mut words = args.split(' ').filter(|w| !w.is_empty());
    let first = words.next();
    if words.next().is_some() {
        return Err(bad(usage));
    }
    Ok(first)
}

/// No words.
fn none(args: &str, usage: &str, command: Command) -> Result<Command, Refusal> {
    if args.trim_matches(' ').is_empty() {
        Ok(command)
    } else {
        Err(bad(usage))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(line: &str) -> Command {
        parse(line, 2000).unwrap().unwrap()
    }

    fn code(line: &str) -> ErrorCode {
        parse(line, 2000).unwrap_err().code
    }

    fn text(s: &str) -> Text {
        Text::parse(s, 2000).unwrap()
    }

    #[test]
    fn plain_lines_are_messages() {
        assert_eq!(ok("hello world"), Command::Say(text("hello world")));
        assert_eq!(parse("", 2000), Ok(None));
    }

    #[test]
    fn double_slash_escapes_one_slash() {
        assert_eq!(ok("//etc/passwd"), Command::Say(text("/etc/passwd")));
        assert_eq!(ok("///"), Command::Say(text("//")));
    }

    #[test]
    fn every_command_parses() {
        assert_eq!(ok("/nick Al"), Command::Nick(Nick::parse("Al").unwrap()));
        assert_eq!(
            ok("/join #General"),
            Command::Join {
                room: RoomName::parse("general").unwrap(),
                after: None
            }
        );
        assert_eq!(
            ok("/join general  42 "),
            Command::Join {
                room: RoomName::parse("general").unwrap(),
                after: Some(42)
            }
        );
        assert_eq!(ok("/leave"), Command::Leave(None));
        assert_eq!(
            ok("/leave x"),
            Command::Leave(Some(RoomName::parse("x").unwrap()))
        );
        assert_eq!(
            ok("/switch x"),
            Command::Switch(RoomName::parse("x").unwrap())
        );
        assert_eq!(ok("/rooms"), Command::Rooms);
        assert_eq!(ok("/who"), Command::Who(None));
        assert_eq!(
            ok("/who #x"),
            Command::Who(Some(RoomName::parse("x").unwrap()))
        );
        assert_eq!(
            ok("/msg bob  hi  there "),
            Command::Msg {
                to: Nick::parse("bob").unwrap(),
                text: text("hi  there "),
            }
        );
        assert_eq!(ok("/me waves"), Command::Me(text("waves")));
        assert_eq!(ok("/history"), Command::History(10));
        assert_eq!(ok("/history 100"), Command::History(100));
        assert_eq!(ok("/format json"), Command::Format(Format::Json));
        assert_eq!(ok("/format text"), Command::Format(Format::Text));
        assert_eq!(ok("/help"), Command::Help);
        assert_eq!(ok("/quit"), Command::Quit);
        assert_eq!(
            ok("/JOIN x 0"),
            Command::Join {
                room: RoomName::parse("x").unwrap(),
                after: Some(0)
            }
        );
    }

    #[test]
    fn bad_input_gets_the_right_code() {
        assert_eq!(code("/dance"), ErrorCode::UnknownCommand);
        assert_eq!(code("/"), ErrorCode::UnknownCommand);
        assert_eq!(code("/nick"), ErrorCode::BadArguments);
        assert_eq!(code("/nick a b"), ErrorCode::BadArguments);
        assert_eq!(code("/nick a.b"), ErrorCode::InvalidNick);
        assert_eq!(code("/join"), ErrorCode::BadArguments);
        assert_eq!(code("/join #"), ErrorCode::InvalidRoom);
        assert_eq!(code("/join x -1"), ErrorCode::BadArguments);
        assert_eq!(code("/join x 1.5"), ErrorCode::BadArguments);
        assert_eq!(
            code("/join x 99999999999999999999"),
            ErrorCode::BadArguments
        );
        assert_eq!(code("/join x 1 2"), ErrorCode::BadArguments);
        assert_eq!(code("/msg bob"), ErrorCode::BadArguments);
        assert_eq!(code("/msg b.b hi"), ErrorCode::InvalidNick);
        assert_eq!(code("/me"), ErrorCode::BadArguments);
        assert_eq!(code("/history 0"), ErrorCode::BadArguments);
        assert_eq!(code("/history 101"), ErrorCode::BadArguments);
        assert_eq!(code("/history x"), ErrorCode::BadArguments);
        assert_eq!(code("/format xml"), ErrorCode::BadArguments);
        assert_eq!(code("/rooms now"), ErrorCode::BadArguments);
        assert_eq!(code(&"x".repeat(2001)), ErrorCode::TooLong);
    }

    #[test]
    fn unknown_commands_never_echo_raw_input() {
        let r = parse("/<script>alert(1)</script>", 2000).unwrap_err();
        assert!(!r.message.contains('<'), "{}", r.message);
        let r = parse("/dance now", 2000).unwrap_err();
        assert!(r.message.contains("/dance"));
    }

    #[test]
    fn max_text_is_a_setting() {
        assert_eq!(parse("hello", 4).unwrap_err().code, ErrorCode::TooLong);
        assert!(parse("hell", 4).is_ok());
    }
}
