//! UF2, the file format the RP2040's boot ROM accepts on its USB drive.
//!
//! A UF2 file is a sequence of 512-byte blocks, each carrying 256 bytes for one flash
//! address. The boot ROM writes every block it receives and reboots after the last one,
//! so a file covering only the configuration sector updates the configuration and leaves
//! the firmware alone. Format: Microsoft's UF2 specification; the RP2040 specifics (family
//! id, 256-byte payloads, whole sectors) are in the RP2040 datasheet, section 2.8.4.

/// Bytes in one UF2 block.
pub const BLOCK_LEN: usize = 512;
/// Payload bytes per block: the RP2040 boot ROM accepts flash pages of 256 bytes only.
pub const PAYLOAD_LEN: usize = 256;
/// The family id of RP2040 images; the boot ROM ignores blocks of other families.
pub const RP2040_FAMILY_ID: u32 = 0xE48B_FF56;

const MAGIC_START0: u32 = 0x0A32_4655;
const MAGIC_START1: u32 = 0x9E5D_5157;
const MAGIC_END: u32 = 0x0AB1_6F30;
/// The block carries a family id (in the field that otherwise holds the file size).
const FLAG_FAMILY_ID_PRESENT: u32 = 0x0000_2000;

/// The UF2 blocks that write `data` to flash starting at `address` (a multiple of 256).
/// The last page is padded with 0xFF, like erased flash.
pub fn blocks(address: u32, data: &[u8]) -> Blocks<'_> {
    Blocks {
        address,
        data,
        next: 0,
    }
}

/// Iterator of [`blocks`].
#[derive(Debug, Clone)]
pub struct Blocks<'a> {
    address: u32,
    data: &'a [u8],
    next: usize,
}

impl Blocks<'_> {
    /// How many blocks the file has.
    pub fn total(&self) -> usize {
        self.data.len().div_ceil(PAYLOAD_LEN)
    }
}

impl Iterator for Blocks<'_> {
    type Item = [u8; BLOCK_LEN];

    fn next(&mut self) -> Option<[u8; BLOCK_LEN]> {
        let total = self.total();
        if self.next >= total {
            return None;
        }
        let index = self.next;
        self.next += 1;
        let start = index * PAYLOAD_LEN;
        let chunk = &self.data[start..(start + PAYLOAD_LEN).min(self.data.len())];
        let mut block = [0u8; BLOCK_LEN];
        let words = [
            MAGIC_START0,
            MAGIC_START1,
            FLAG_FAMILY_ID_PRESENT,
            self.address + start as u32,
            PAYLOAD_LEN as u32,
            index as u32,
            total as u32,
            RP2040_FAMILY_ID,
        ];
        for (i, word) in words.iter().enumerate() {
            block[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
        }
        let payload = &mut block[32..32 + PAYLOAD_LEN];
        payload.fill(0xFF);
        payload[..chunk.len()].copy_from_slice(chunk);
        block[BLOCK_LEN - 4..].copy_from_slice(&MAGIC_END.to_le_bytes());
        Some(block)
    }
}

/// One block read back: where its payload goes, and the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block<'a> {
    /// Flash address of the payload.
    pub address: u32,
    /// Index of this block in its file.
    pub index: u32,
    /// Blocks in the file.
    pub total: u32,
    /// Family id.
    pub family: u32,
    /// The payload.
    pub payload: &'a [u8],
}

/// Reads one 512-byte block; `None` unless both magics and the payload size are sane.
pub fn parse_block(block: &[u8]) -> Option<Block<'_>> {
    if block.len() != BLOCK_LEN {
        return None;
    }
    let word = |i: usize| {
        u32::from_le_bytes([
            block[i * 4],
            block[i * 4 + 1],
            block[i * 4 + 2],
            block[i * 4 + 3],
        ])
    };
    let end = u32::from_le_bytes([block[508], block[509], block[510], block[511]]);
    if word(0) != MAGIC_START0 || word(1) != MAGIC_START1 || end != MAGIC_END {
        return None;
    }
    let size = word(4) as usize;
    if size > 476 {
        return None;
    }
    Some(Block {
        address: word(3),
        index: word(5),
        total: word(6),
        family: word(7),
        payload: &block[32..32 + size],
    })
}
