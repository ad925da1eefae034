//! The boot id: a number that differs on every boot, because sequence numbers start at 1
//! again after a reset (see `fogline_firmware::node::NodeConfig::boot`).
//!
//! The RP2040 has no hardware RNG, but its ring oscillator's `RANDOMBIT` register yields
//! one noisy bit per read (embassy-rp's `RoscRng` gathers 32 of them into a word). Those
//! bits are biased and correlated, so several words are folded through a mixing function
//! rather than used as they are. A counter in flash would also work, but costs a flash
//! erase per boot and a second reserved sector; 32 mixed noisy words make a collision
//! between two boots of one device about as likely as a 32-bit random number allows.

/// Words read from the random source for one boot id.
pub const WORDS: usize = 8;

/// The source returned the same word every time: it is stuck, not random.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StuckSource;

/// A boot id from [`WORDS`] words of `next_word` (e.g. `RoscRng::next_u32`). Never 0 (0
/// reads as "no boot id" in hand-written JSON readings).
pub fn from_words(mut next_word: impl FnMut() -> u32) -> Result<u32, StuckSource> {
    let first = next_word();
    let mut all_same = true;
    let mut state = mix(first);
    for i in 1..WORDS {
        let word = next_word();
        all_same &= word == first;
        state = mix(state.rotate_left(5) ^ word ^ (i as u32));
    }
    if all_same {
        return Err(StuckSource);
    }
    Ok(if state == 0 { 1 } else { state })
}

/// A boot id for when the random source is stuck: mixes whatever varies between boots that
/// the caller has (e.g. timer ticks at the moment Wi-Fi came up). Never 0.
pub fn fallback(varying: u64) -> u32 {
    let folded = mix((varying as u32) ^ mix((varying >> 32) as u32));
    if folded == 0 {
        1
    } else {
        folded
    }
}

/// MurmurHash3's 32-bit finalizer: every input bit affects every output bit.
fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn counter(start: u32, step: u32) -> impl FnMut() -> u32 {
        let mut next = start;
        move || {
            let v = next;
            next = next.wrapping_add(step);
            v
        }
    }

    #[test]
    fn a_stuck_source_is_reported_not_used() {
        for word in [0u32, u32::MAX, 0x5555_5555] {
            assert_eq!(from_words(|| word), Err(StuckSource), "{word:#x}");
        }
    }

    #[test]
    fn sources_differing_in_one_bit_give_unrelated_ids() {
        // Two boots whose noisy words differ only in the lowest bit of the last word.
        let a = [1u32, 2, 3, 4, 5, 6, 7, 8];
        let mut b = a;
        b[7] ^= 1;
        let id = |words: [u32; 8]| {
            let mut it = words.into_iter();
            from_words(|| it.next().unwrap_or(0))
        };
        let (ida, idb) = (id(a).expect("varied"), id(b).expect("varied"));
        // An avalanche: about half of the 32 bits flip.
        let flipped = (ida ^ idb).count_ones();
        assert!((8..=24).contains(&flipped), "{ida:#x} vs {idb:#x}");
    }

    #[test]
    fn weak_sources_still_spread_over_many_ids() {
        // 10,000 "boots" of a very weak source: words that are mostly zero, counting up.
        let ids: HashSet<u32> = (0..10_000u32)
            .map(|boot| from_words(counter(boot, 1)).expect("varied"))
            .collect();
        assert_eq!(ids.len(), 10_000);
        assert!(!ids.contains(&0));
    }

    #[test]
    fn the_fallback_varies_with_its_input_and_is_never_zero() {
        let ids: HashSet<u32> = (0..10_000u64).map(|t| fallback(t * 1_000_003)).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(!ids.contains(&0));
        assert_ne!(fallback(1 << 32), fallback(1));
    }
}
