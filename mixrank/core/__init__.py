"""mixrank.core: what every stage shares, at the bottom of the import chain.

- errors: `MixrankError` (a user mistake: one line, exit 2), `WriteError`, `warn` (one
  line on stderr), `close_matches`, `import_onnxruntime` (whichever onnxruntime build is installed);
- files: `atomic_write` and its helpers, the one way an artifact is written; output
  folders with their lock; `sha256_file`; `json_text` (strict JSON, no bare NaN);
- `Registry`: the named implementations of an extension point (with lazy entries);
- `lazy_exports`: package namespaces imported on first use;
- `Record` and `Table`: typed records that are also JSON objects;
- `read_toml`: the TOML files users write.

It imports nothing but the standard library, each name on first use, so an engine
process that only needs it stays small.
"""

from ._lazy import lazy_exports

lazy_exports(globals(), {
    "._errors": ("ORT_MISSING", "MixrankError", "WriteError", "close_matches", "import_onnxruntime", "is_number",
                  "warn"),
    "._io": ("FolderLock", "atomic_write", "atomic_write_bytes", "atomic_write_text", "check_writable_path",
             "file_mode", "json_text", "output_dir", "output_folder", "sha256_file"),
    "._lazy": ("lazy_exports",),
    "._records": ("Record", "Table", "zero_of"),
    "._registry": ("Registry",),
    "._toml": ("MAX_DEPTH", "check_depth", "loads_json", "nesting_depth", "read_toml", "read_toml_text"),
})
