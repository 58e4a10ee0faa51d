//! What reading raw text yields: documents, and the bad records that were skipped (or that end
//! the read), with their kinds and locations. Shared by every input format.

/// What can be wrong with one record, or (the last three) with a whole file or part of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BadKind {
    InvalidUtf8,
    MalformedJson,
    MissingField,
    NotAString,
    TooLong,
    CorruptFile,
    UnreadableRowGroup,
}

impl BadKind {
    pub fn name(self) -> &'static str {
        match self {
            BadKind::InvalidUtf8 => "invalid_utf8",
            BadKind::MalformedJson => "malformed_json",
            BadKind::MissingField => "missing_field",
            BadKind::NotAString => "not_a_string",
            BadKind::TooLong => "too_long",
            BadKind::CorruptFile => "corrupt_file",
            BadKind::UnreadableRowGroup => "unreadable_row_group",
        }
    }

    /// Damage to a file rather than one bad record.
    pub fn is_file_level(self) -> bool {
        matches!(self, BadKind::CorruptFile | BadKind::UnreadableRowGroup)
    }
}

/// A skipped record (or, for file-level kinds, the records lost with the damaged part).
#[derive(Debug, Clone, PartialEq)]
pub struct Bad {
    pub kind: BadKind,
    /// `file:line` (1-based) for line-based files, `file:row N` (0-based) or `file:row group N`
    /// for Parquet, `file` alone for a file that could not be opened as its format.
    pub location: String,
    pub detail: String,
    /// Records this covers: 1, or the rows of a Parquet file without the column.
    pub records: u64,
}

/// One document, or one piece of a long `.txt` document (`starts == false` for the pieces that
/// continue it).
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    pub text: String,
    pub starts: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Doc(Doc),
    Bad(Bad),
}
