//! Misuse of `#[task]` and `#[flow]` fails to compile with a message that says what to do.

#[test]
fn misuse_is_refused_with_a_clear_message() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
