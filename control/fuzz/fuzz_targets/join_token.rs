//! A join token as a user pastes it (`overlayd join --token`, the Join request of the local
//! API): `JoinToken::from_str` never panics, and a token it accepts prints as a token that
//! parses back to it.
#![no_main]

use control::pki::JoinToken;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(token) = text.parse::<JoinToken>() else { return };
    let printed = token.to_string();
    assert_eq!(printed.parse::<JoinToken>().as_ref(), Ok(&token), "{printed} parses back");
    assert!(text.trim().eq_ignore_ascii_case(&printed), "{text:?} is the token {printed} (up to the digest's case)");
    let _ = JoinToken::secret_hash(&token.secret);
});
