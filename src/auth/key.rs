//! The API key format (SPEC §3): `nz_` + 9 prefix characters + 32 secret characters, 44 in all,
//! drawn from a CSPRNG over an alphabet without look-alike characters.

use secrecy::{ExposeSecret, SecretString};

/// Alphanumerics without 0/O, 1/I/l: keys get read aloud and copied by hand.
pub const ALPHABET: &[u8] = b"23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
pub const KEY_PREFIX_MARK: &str = "nz_";
/// Length of the stored, public prefix including `nz_`.
pub const PREFIX_LEN: usize = 12;
pub const SECRET_LEN: usize = 32;
pub const KEY_LEN: usize = PREFIX_LEN + SECRET_LEN;

#[derive(Debug, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RngError;

/// A freshly generated key. The full key exists only here and in `create-key`'s output.
pub struct NewKey {
    pub prefix: String,
    pub full: SecretString,
}

pub fn generate() -> Result<NewKey, RngError> {
    let mut full = String::with_capacity(KEY_LEN);
    full.push_str(KEY_PREFIX_MARK);
    push_random(&mut full, KEY_LEN - KEY_PREFIX_MARK.len())?;
    let prefix = full[..PREFIX_LEN].to_string();
    Ok(NewKey {
        prefix,
        full: SecretString::from(full),
    })
}

/// Uniform draws by rejection sampling: bytes at or above the largest multiple of the alphabet
/// size are thrown away so no character is more likely than another.
fn push_random(out: &mut String, count: usize) -> Result<(), RngError> {
    let n = ALPHABET.len();
    let limit = 256 - (256 % n);
    let mut buf = [0u8; 64];
    let mut remaining = count;
    while remaining > 0 {
        getrandom::fill(&mut buf).map_err(|_| RngError)?;
        for &b in &buf {
            if remaining == 0 {
                break;
            }
            if usize::from(b) < limit {
                out.push(char::from(ALPHABET[usize::from(b) % n]));
                remaining -= 1;
            }
        }
    }
    Ok(())
}

/// Cheap shape check before any cache or hashing work: malformed tokens never cost Argon2.
pub fn is_well_formed(token: &str) -> bool {
    has_shape(token, KEY_LEN)
}

/// The public prefix of a well-formed token.
pub fn prefix_of(token: &str) -> &str {
    &token[..PREFIX_LEN.min(token.len())]
}

/// A shape check for prefixes given on the command line.
pub fn is_valid_prefix(prefix: &str) -> bool {
    has_shape(prefix, PREFIX_LEN)
}

/// `nz_` followed by `len - 3` characters of the key alphabet.
fn has_shape(s: &str, len: usize) -> bool {
    s.len() == len
        && s.starts_with(KEY_PREFIX_MARK)
        && s.as_bytes()[KEY_PREFIX_MARK.len()..]
            .iter()
            .all(|b| ALPHABET.contains(b))
}

pub fn expose(key: &NewKey) -> &str {
    key.full.expose_secret()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_documented_shape() {
        for _ in 0..200 {
            let k = generate().unwrap();
            let full = expose(&k);
            assert_eq!(full.len(), 44);
            assert!(is_well_formed(full), "{full}");
            assert_eq!(prefix_of(full), k.prefix);
            assert!(is_valid_prefix(&k.prefix));
        }
    }

    #[test]
    fn keys_are_unique_and_use_the_whole_alphabet() {
        let mut seen = std::collections::HashSet::new();
        let mut chars = std::collections::HashSet::new();
        for _ in 0..500 {
            let k = generate().unwrap();
            chars.extend(expose(&k)[3..].bytes());
            assert!(seen.insert(expose(&k).to_string()));
        }
        assert_eq!(chars.len(), ALPHABET.len());
    }

    #[test]
    fn shape_check_rejects_near_misses() {
        let good = expose(&generate().unwrap()).to_string();
        assert!(is_well_formed(&good));
        assert!(!is_well_formed(&good[..43]));
        assert!(!is_well_formed(&format!("{good}x")));
        assert!(!is_well_formed(&good.replacen("nz_", "NZ_", 1)));
        let mut with_zero = good.clone();
        with_zero.replace_range(20..21, "0");
        assert!(!is_well_formed(&with_zero));
        assert!(!is_well_formed(""));
        assert!(!is_well_formed("nz_ééééééééééééééééééééé"));
    }
}
