//! The raw inputs of `prepare` and `tokenizer train`: the files that `--input` names.

use super::DataError;
use std::path::PathBuf;

/// The text files named by the inputs: files as given, directories expanded to their sorted
/// regular files (not recursively).
pub fn text_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(input)
                .map_err(|e| DataError::io(input, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            entries.sort();
            files.extend(entries);
        } else if input.is_file() {
            files.push(input.clone());
        } else {
            return Err(DataError::io(
                input,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
    }
    if files.is_empty() {
        return Err(DataError::Invalid("--input names no files".into()));
    }
    Ok(files)
}
