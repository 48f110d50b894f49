// Copyright 2016 Pierre-Étienne Meunier
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
// http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.
//

// http://cvsweb.openbsd.org/cgi-bin/cvsweb/src/usr.bin/ssh/PROTOCOL.chacha20poly1305?annotate=HEAD

#[cfg(feature = "aws-lc-rs")]
use aws_lc_rs::aead::chacha20_poly1305_openssh;
#[cfg(all(not(feature = "aws-lc-rs"), feature = "ring"))]
use ring::aead::chacha20_poly1305_openssh;

use super::super::Error;
use crate::mac::MacAlgorithm;

pub struct SshChacha20Poly1305Cipher {}

impl super::Cipher for SshChacha20Poly1305Cipher {
    fn key_len(&self) -> usize {
        chacha20_poly1305_openssh::KEY_LEN
    }

    fn make_opening_key(
        &self,
        k: &[u8],
        _: &[u8],
        _: &[u8],
        _: &dyn MacAlgorithm,
    ) -> Box<dyn super::OpeningKey + Send> {
        // sandboxd patch: see `wide::available`.
        if let Some(key) = wide::Key::new(k) {
            return Box::new(wide::OpeningKey(key));
        }
        Box::new(OpeningKey(chacha20_poly1305_openssh::OpeningKey::new(
            #[allow(clippy::unwrap_used)]
            k.try_into().unwrap(),
        )))
    }

    fn make_sealing_key(
        &self,
        k: &[u8],
        _: &[u8],
        _: &[u8],
        _: &dyn MacAlgorithm,
    ) -> Box<dyn super::SealingKey + Send> {
        // sandboxd patch: see `wide::available`.
        if let Some(key) = wide::Key::new(k) {
            return Box::new(wide::SealingKey(key));
        }
        Box::new(SealingKey(chacha20_poly1305_openssh::SealingKey::new(
            #[allow(clippy::unwrap_used)]
            k.try_into().unwrap(),
        )))
    }
}

pub struct OpeningKey(chacha20_poly1305_openssh::OpeningKey);

pub struct SealingKey(chacha20_poly1305_openssh::SealingKey);

impl super::OpeningKey for OpeningKey {
    fn decrypt_packet_length(
        &self,
        sequence_number: u32,
        encrypted_packet_length: &[u8],
    ) -> [u8; 4] {
        self.0.decrypt_packet_length(
            sequence_number,
            #[allow(clippy::unwrap_used)]
            encrypted_packet_length.try_into().unwrap(),
        )
    }

    fn tag_len(&self) -> usize {
        chacha20_poly1305_openssh::TAG_LEN
    }

    fn open<'a>(
        &mut self,
        sequence_number: u32,
        ciphertext_and_tag: &'a mut [u8],
    ) -> Result<&'a [u8], Error> {
        let ciphertext_len = ciphertext_and_tag.len() - self.tag_len();
        let (ciphertext_in_plaintext_out, tag) = ciphertext_and_tag.split_at_mut(ciphertext_len);

        self.0
            .open_in_place(
                sequence_number,
                ciphertext_in_plaintext_out,
                #[allow(clippy::unwrap_used)]
                &tag.try_into().unwrap(),
            )
            .map_err(|_| Error::DecryptionError)
    }
}

impl super::SealingKey for SealingKey {
    fn padding_length(&self, payload: &[u8]) -> usize {
        padding_length(payload)
    }

    // As explained in "SSH via CTR mode with stateful decryption" in
    // https://openvpn.net/papers/ssh-security.pdf, the padding doesn't need to
    // be random because we're doing stateful counter-mode encryption. Use
    // fixed padding to avoid PRNG overhead.
    fn fill_padding(&self, padding_out: &mut [u8]) {
        for padding_byte in padding_out {
            *padding_byte = 0;
        }
    }

    fn tag_len(&self) -> usize {
        chacha20_poly1305_openssh::TAG_LEN
    }

    fn seal(
        &mut self,
        sequence_number: u32,
        plaintext_in_ciphertext_out: &mut [u8],
        tag: &mut [u8],
    ) {
        self.0.seal_in_place(
            sequence_number,
            plaintext_in_ciphertext_out,
            #[allow(clippy::unwrap_used)]
            tag.try_into().unwrap(),
        );
    }
}

/// Padding for 8-byte blocks (the cipher is a stream cipher: the block size
/// is the protocol's minimum of 8).
fn padding_length(payload: &[u8]) -> usize {
    let block_size = 8;
    let extra_len = super::PACKET_LENGTH_LEN + super::PADDING_LENGTH_LEN;
    let padding_len = if payload.len() + extra_len <= super::MINIMUM_PACKET_LEN {
        super::MINIMUM_PACKET_LEN - payload.len() - super::PADDING_LENGTH_LEN
    } else {
        block_size - ((super::PADDING_LENGTH_LEN + payload.len()) % block_size)
    };
    if padding_len < super::PACKET_LENGTH_LEN {
        padding_len + block_size
    } else {
        padding_len
    }
}

/// sandboxd patch: the same construction on the RustCrypto `chacha20` and
/// `poly1305` crates, used where they beat ring. ring's openssh variant
/// runs ChaCha20 in AVX2 assembly but Poly1305 in portable C; with AVX-512
/// (detected at run time) `chacha20` is about four times as fast as ring's
/// ChaCha20 and `poly1305`'s AVX2 code about 1.5 times ring's Poly1305, so
/// the whole cipher is about 1.8 times as fast (see
/// SANDBOXD-PATCHES.md). Without AVX-512 ring stays faster, and is kept.
///
/// The construction (PROTOCOL.chacha20poly1305): the 64-byte key is
/// K_2 || K_1; the nonce is the packet's sequence number (64-bit, big
/// endian), i.e. the IETF 96-bit nonce 0^8 || seqn as long as the block
/// counter stays below 2^32 (packets are far shorter). K_1's block 0
/// encrypts the 4-byte packet length; K_2's block 0 gives the Poly1305 key
/// and blocks 1.. encrypt the rest; the tag covers the encrypted length and
/// ciphertext.
mod wide {
    use chacha20::ChaCha20;
    use chacha20::cipher::{KeyIvInit, StreamCipher};
    use poly1305::Poly1305;
    use poly1305::universal_hash::KeyInit;
    use subtle::ConstantTimeEq;

    use crate::Error;
    use crate::cipher::PACKET_LENGTH_LEN;

    const TAG_LEN: usize = 16;

    /// Whether `chacha20` runs its AVX-512 code here: the build enables it
    /// (`--cfg chacha20_avx512`, see the workspace's `.cargo/config.toml`)
    /// and the CPU has it. Both crates pick their code at run time (they
    /// fall back to AVX2/SSE2 or portable code), so this is only a choice
    /// of the faster implementation, never of correctness.
    pub(super) fn available() -> bool {
        #[cfg(all(chacha20_avx512, any(target_arch = "x86", target_arch = "x86_64")))]
        {
            std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl")
        }
        #[cfg(not(all(chacha20_avx512, any(target_arch = "x86", target_arch = "x86_64"))))]
        {
            false
        }
    }

    pub(super) struct Key {
        k_1: [u8; 32],
        k_2: [u8; 32],
    }

    impl Drop for Key {
        fn drop(&mut self) {
            use zeroize::Zeroize;
            self.k_1.zeroize();
            self.k_2.zeroize();
        }
    }

    impl Key {
        pub(super) fn new(k: &[u8]) -> Option<Key> {
            if !available() {
                return None;
            }
            Self::from_bytes(k)
        }

        pub(super) fn from_bytes(k: &[u8]) -> Option<Key> {
            let (k_2, k_1) = k.split_at_checked(32)?;
            Some(Key {
                k_1: k_1.try_into().ok()?,
                k_2: k_2.try_into().ok()?,
            })
        }

        fn stream(key: &[u8; 32], seqn: u32) -> ChaCha20 {
            let mut nonce = [0u8; 12];
            #[allow(clippy::indexing_slicing)] // fixed sizes
            nonce[8..].copy_from_slice(&seqn.to_be_bytes());
            ChaCha20::new(key.into(), (&nonce).into())
        }

        fn length(&self, seqn: u32, len: &mut [u8]) {
            Self::stream(&self.k_1, seqn).apply_keystream(len);
        }

        /// K_2's stream positioned at block 1, and the Poly1305 key.
        fn payload(&self, seqn: u32) -> (ChaCha20, Poly1305) {
            let mut stream = Self::stream(&self.k_2, seqn);
            let mut block0 = [0u8; 64];
            stream.apply_keystream(&mut block0);
            #[allow(clippy::indexing_slicing)] // fixed sizes
            let mac = Poly1305::new((&block0[..32]).try_into().unwrap_or(&[0; 32]).into());
            {
                use zeroize::Zeroize;
                block0.zeroize();
            }
            (stream, mac)
        }
    }

    pub(super) struct OpeningKey(pub(super) Key);

    pub(super) struct SealingKey(pub(super) Key);

    impl crate::cipher::OpeningKey for OpeningKey {
        fn decrypt_packet_length(&self, seqn: u32, encrypted: &[u8]) -> [u8; 4] {
            let mut len = [0u8; 4];
            #[allow(clippy::indexing_slicing)] // the caller reads 4 bytes
            len.copy_from_slice(&encrypted[..4]);
            self.0.length(seqn, &mut len);
            len
        }

        fn tag_len(&self) -> usize {
            TAG_LEN
        }

        fn open<'a>(
            &mut self,
            seqn: u32,
            ciphertext_and_tag: &'a mut [u8],
        ) -> Result<&'a [u8], Error> {
            let ciphertext_len = ciphertext_and_tag
                .len()
                .checked_sub(TAG_LEN)
                .filter(|l| *l >= PACKET_LENGTH_LEN)
                .ok_or(Error::DecryptionError)?;
            let (ciphertext, tag) = ciphertext_and_tag.split_at_mut(ciphertext_len);
            let (mut stream, mac) = self.0.payload(seqn);
            // Authenticate before decrypting anything.
            let computed = mac.compute_unpadded(ciphertext);
            if !bool::from(computed.as_slice().ct_eq(tag)) {
                return Err(Error::DecryptionError);
            }
            #[allow(clippy::indexing_slicing)] // length checked
            let body = &mut ciphertext[PACKET_LENGTH_LEN..];
            stream.apply_keystream(body);
            Ok(body)
        }
    }

    impl crate::cipher::SealingKey for SealingKey {
        fn padding_length(&self, payload: &[u8]) -> usize {
            super::padding_length(payload)
        }

        // Fixed padding, as for ring's implementation above.
        fn fill_padding(&self, padding_out: &mut [u8]) {
            padding_out.fill(0);
        }

        fn tag_len(&self) -> usize {
            TAG_LEN
        }

        fn seal(&mut self, seqn: u32, plaintext_in_ciphertext_out: &mut [u8], tag: &mut [u8]) {
            if plaintext_in_ciphertext_out.len() < PACKET_LENGTH_LEN {
                return;
            }
            let (len, body) = plaintext_in_ciphertext_out.split_at_mut(PACKET_LENGTH_LEN);
            self.0.length(seqn, len);
            let (mut stream, mac) = self.0.payload(seqn);
            stream.apply_keystream(body);
            let computed = mac.compute_unpadded(plaintext_in_ciphertext_out);
            tag.copy_from_slice(computed.as_slice());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{OpeningKey as _, SealingKey as _};
    use super::*;

    fn packet(seqn: u32, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; 4 + len];
        p[..4].copy_from_slice(&(len as u32).to_be_bytes());
        for (i, b) in p[4..].iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(31).wrapping_add(seqn) as u8;
        }
        p
    }

    /// The RustCrypto implementation and ring's agree byte for byte, both
    /// ways, and a flipped bit is refused.
    #[test]
    fn wide_matches_ring() {
        let key: Vec<u8> = (0..64u8).map(|b| b.wrapping_mul(7)).collect();
        let k: &[u8; 64] = key.as_slice().try_into().unwrap();
        for (seqn, len) in [(0u32, 12usize), (1, 60), (7, 1000), (u32::MAX, 65_560)] {
            let plain = packet(seqn, len);

            let mut a = plain.clone();
            let mut tag_a = [0u8; 16];
            SealingKey(chacha20_poly1305_openssh::SealingKey::new(k))
                .seal(seqn, &mut a, &mut tag_a);
            let mut b = plain.clone();
            let mut tag_b = [0u8; 16];
            wide::SealingKey(wide::Key::from_bytes(&key).unwrap()).seal(seqn, &mut b, &mut tag_b);
            assert_eq!(a, b);
            assert_eq!(tag_a, tag_b);

            let mut w = wide::OpeningKey(wide::Key::from_bytes(&key).unwrap());
            let r = OpeningKey(chacha20_poly1305_openssh::OpeningKey::new(k));
            assert_eq!(w.decrypt_packet_length(seqn, &a[..4]), plain[..4]);
            assert_eq!(r.decrypt_packet_length(seqn, &a[..4]), plain[..4]);
            let mut sealed = a.clone();
            sealed.extend_from_slice(&tag_a);
            let mut opened = sealed.clone();
            assert_eq!(w.open(seqn, &mut opened).unwrap(), &plain[4..]);

            let mut bad = sealed.clone();
            bad[len / 2 + 4] ^= 1;
            assert!(w.open(seqn, &mut bad).is_err());
            let mut bad = sealed;
            bad[2] ^= 0x80;
            assert!(w.open(seqn, &mut bad).is_err());
        }
    }
}
