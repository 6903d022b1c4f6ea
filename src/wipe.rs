//! Wiping buffers that held message content (PHI) before their memory goes back to the
//! allocator (promise 3: a freed block is read by the next allocation, or by a heap dump).
//!
//! `Vec::zeroize` writes the contents a byte at a time and cannot reach the blocks a `Vec`
//! left behind when it grew: growth copies into a new block and frees the old one as it was.
//! [`vec`] zeroes a whole allocation with one `memset`; [`extend`] grows a buffer itself and
//! wipes the old block first.

use zeroize::Zeroize;

/// Zeroes the whole allocation of `v`, contents and spare capacity, and empties it (keeping
/// its capacity).
pub fn vec(v: &mut Vec<u8>) {
    v.clear();
    v.spare_capacity_mut().zeroize();
}

/// Appends `data` to `v`. When `v` must grow, the new block is allocated here and the old one
/// wiped before it is freed. It grows to twice its capacity, capped at `limit`, or to what
/// `data` needs if that is more.
pub fn extend(v: &mut Vec<u8>, data: &[u8], limit: usize) {
    let need = v.len().saturating_add(data.len());
    if need > v.capacity() {
        let cap = need.max(v.capacity().saturating_mul(2).min(limit));
        let mut grown = Vec::with_capacity(cap);
        grown.extend_from_slice(v);
        vec(v);
        *v = grown;
    }
    v.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extend_keeps_the_contents_and_bounds_the_growth() {
        let mut v = Vec::new();
        extend(&mut v, b"MSH|", 64);
        // A first allocation takes what is needed, as a frame read whole is sized exactly.
        assert_eq!(v.capacity(), 4);
        extend(&mut v, b"^~\\&|", 64);
        assert_eq!(v, b"MSH|^~\\&|");
        assert_eq!(v.capacity(), 9);
        extend(&mut v, b"0123456789", 64);
        // Twice the old capacity, when that is more than needed.
        assert_eq!(v.capacity(), 19);
        extend(&mut v, b"0123456789", 64);
        assert_eq!(v.capacity(), 38);
        for _ in 0..8 {
            extend(&mut v, b"0123456789", 64);
        }
        assert_eq!(v.len(), 109);
        assert_eq!(&v[..9], b"MSH|^~\\&|");
        assert!(v[9..].chunks(10).all(|c| c == b"0123456789"));
        // Past the limit, growth takes what the data needs and no more.
        assert_eq!(v.capacity(), 109);
    }

    #[test]
    fn vec_empties_and_keeps_the_block() {
        let mut v = b"PID|1||12345".to_vec();
        let cap = v.capacity();
        vec(&mut v);
        assert!(v.is_empty());
        assert_eq!(v.capacity(), cap);
    }
}
