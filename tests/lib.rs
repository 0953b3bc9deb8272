//! Cross-crate integration tests of Flotilla that run in one process (see the `[[test]]`
//! targets of this package). Tests that drive the `flotilla` binary live in `cli/tests/`.
