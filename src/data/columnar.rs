//! Parquet inputs: the text column of a file, read row group by row group in batches, with
//! missing columns, nulls and unreadable row groups reported as bad records. A compressed
//! `.parquet.gz`/`.zst` is inflated to a temporary file first (Parquet needs random access).

use super::records::{Bad, BadKind, Doc, Item};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A compressed Parquet file inflated to a temporary file (removed on drop).
pub(super) struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(super) fn inflate_to_temp(
    mut reader: Box<dyn Read + Send>,
) -> std::io::Result<(std::fs::File, TempFile)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "motrain-{}-{}.parquet",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let temp = TempFile(path.clone());
    let mut out = std::fs::File::create(&path)?;
    std::io::copy(&mut reader, &mut out)?;
    drop(out);
    Ok((std::fs::File::open(&path)?, temp))
}

/// The text column of a Parquet file, read row group by row group in batches of rows.
pub(super) struct ParquetSource {
    path: PathBuf,
    reader: parquet::file::serialized_reader::SerializedFileReader<std::fs::File>,
    column: usize,
    max_def: i16,
    row_group: usize,
    column_reader:
        Option<parquet::column::reader::ColumnReaderImpl<parquet::data_type::ByteArrayType>>,
    /// Rows of the current row group read so far, and rows of the file before it.
    rg_rows_done: u64,
    rows_before: u64,
    pub(super) items: Vec<Item>,
    _temp: Option<TempFile>,
}

const PARQUET_BATCH: usize = 1024;

impl ParquetSource {
    /// The source, or none (with the bad items that say why) when the file has no usable column.
    pub(super) fn open(
        path: &Path, file: std::fs::File, temp: Option<TempFile>, field: &str,
    ) -> Result<(Option<ParquetSource>, Vec<Bad>), Bad> {
        use parquet::file::reader::FileReader;
        let reader =
            parquet::file::serialized_reader::SerializedFileReader::new(file).map_err(|e| Bad {
                kind: BadKind::CorruptFile,
                location: path.display().to_string(),
                detail: format!("not a readable Parquet file: {e}"),
                records: 0,
            })?;
        let meta = reader.metadata();
        let rows = meta.file_metadata().num_rows().max(0) as u64;
        let schema = meta.file_metadata().schema_descr();
        let at = format!("{}:row 0", path.display());
        let Some(column) = schema.columns().iter().position(|c| c.path().string() == field) else {
            let names: Vec<String> = schema.columns().iter().map(|c| c.path().string()).collect();
            let detail = format!(
                "no column {field:?} (columns: {}); all {rows} rows skipped",
                names.join(", ")
            );
            return Ok((
                None,
                vec![Bad { kind: BadKind::MissingField, location: at, detail, records: rows }],
            ));
        };
        let descr = schema.column(column);
        if descr.physical_type() != parquet::basic::Type::BYTE_ARRAY || descr.max_rep_level() > 0 {
            let detail = format!(
                "column {field:?} is {:?}, not a string column; all {rows} rows skipped",
                descr.physical_type()
            );
            return Ok((
                None,
                vec![Bad { kind: BadKind::NotAString, location: at, detail, records: rows }],
            ));
        }
        let max_def = descr.max_def_level();
        Ok((
            Some(ParquetSource {
                path: path.to_path_buf(),
                reader,
                column,
                max_def,
                row_group: 0,
                column_reader: None,
                rg_rows_done: 0,
                rows_before: 0,
                items: Vec::new(),
                _temp: temp,
            }),
            Vec::new(),
        ))
    }

    /// Reads the next batch of rows into `items`: `Ok(false)` at the end of the file; an error
    /// for a row group that cannot be read (the rest of that row group is lost, the reader then
    /// goes on with the next one).
    pub(super) fn next_batch(&mut self) -> Result<bool, Bad> {
        use parquet::file::reader::FileReader;
        loop {
            if self.column_reader.is_none() {
                if self.row_group >= self.reader.num_row_groups() {
                    return Ok(false);
                }
                let opened = self
                    .reader
                    .get_row_group(self.row_group)
                    .and_then(|rg| rg.get_column_reader(self.column));
                match opened {
                    Ok(parquet::column::reader::ColumnReader::ByteArrayColumnReader(r)) => {
                        self.column_reader = Some(r)
                    }
                    Ok(_) => {
                        // The schema said BYTE_ARRAY; a row group that disagrees is damaged.
                        let e = parquet::errors::ParquetError::General(
                            "column chunk is not BYTE_ARRAY".into(),
                        );
                        return Err(self.lose_row_group(e));
                    }
                    Err(e) => return Err(self.lose_row_group(e)),
                }
            }
            let mut defs = Vec::with_capacity(PARQUET_BATCH);
            let mut values = Vec::with_capacity(PARQUET_BATCH);
            let reader = self.column_reader.as_mut().expect("opened above");
            let read = reader.read_records(
                PARQUET_BATCH,
                (self.max_def > 0).then_some(&mut defs),
                None,
                &mut values,
            );
            let (records, _, _) = match read {
                Ok(r) => r,
                Err(e) => return Err(self.lose_row_group(e)),
            };
            if records == 0 {
                self.finish_row_group();
                continue;
            }
            let mut values = values.into_iter();
            for k in 0..records {
                let row = self.rows_before + self.rg_rows_done + k as u64;
                let at = || format!("{}:row {row}", self.path.display());
                // A required column has no definition levels: every row is present.
                let present = self.max_def == 0 || defs.get(k) == Some(&self.max_def);
                let item = match present.then(|| values.next()).flatten() {
                    None => Item::Bad(Bad {
                        kind: BadKind::NotAString,
                        location: at(),
                        detail: "null".into(),
                        records: 1,
                    }),
                    Some(v) => match String::from_utf8(v.data().to_vec()) {
                        Ok(text) => Item::Doc(Doc { text, starts: true }),
                        Err(e) => Item::Bad(Bad {
                            kind: BadKind::InvalidUtf8,
                            location: at(),
                            detail: format!(
                                "invalid UTF-8 at byte {}",
                                e.utf8_error().valid_up_to()
                            ),
                            records: 1,
                        }),
                    },
                };
                self.items.push(item);
            }
            self.rg_rows_done += records as u64;
            return Ok(true);
        }
    }

    fn finish_row_group(&mut self) {
        use parquet::file::reader::FileReader;
        let rows = self.reader.metadata().row_group(self.row_group).num_rows().max(0) as u64;
        self.rows_before += rows;
        self.rg_rows_done = 0;
        self.row_group += 1;
        self.column_reader = None;
    }

    fn lose_row_group(&mut self, e: parquet::errors::ParquetError) -> Bad {
        use parquet::file::reader::FileReader;
        let rows = self.reader.metadata().row_group(self.row_group).num_rows().max(0) as u64;
        let lost = rows.saturating_sub(self.rg_rows_done);
        let b = Bad {
            kind: BadKind::UnreadableRowGroup,
            location: format!("{}:row group {}", self.path.display(), self.row_group),
            detail: format!("{e}; {lost} rows lost"),
            records: lost,
        };
        self.finish_row_group();
        b
    }
}
