//! Property-based fuzzing of every parser of bytes from disk: arbitrary
//! input and mutations of valid encodings must give an error, never a
//! panic, a hang or a huge allocation, and never a wrong "success".
use datamover::ChunkId;
use datamover::format::frame::{FRAME_HEADER_LEN, FrameDecoder, FrameEncoder, FrameHeader};
use datamover::format::{index, manifest, pack};
use proptest::prelude::*;

fn valid_frame(data: &[u8], level: Option<i32>) -> (ChunkId, Vec<u8>) {
    let id = ChunkId::of(data);
    let mut out = Vec::new();
    FrameEncoder::new(level)
        .expect("enc")
        .encode_into(id, data, &mut out)
        .expect("encode");
    (id, out)
}

fn valid_manifest(n: usize) -> Vec<u8> {
    let mut w = manifest::ManifestWriter::new(Vec::new()).expect("writer");
    for i in 0..n {
        let e = if i % 3 == 0 {
            manifest::Extent::Zero {
                len: 4096 * (i as u64 + 1),
            }
        } else {
            manifest::Extent::Chunk {
                id: ChunkId([i as u8; 32]),
                len: 1000 + i as u32,
            }
        };
        w.push(e).expect("push");
    }
    let size = w.size();
    let meta = manifest::PointMeta {
        name: "vm/disk".into(),
        point: "20261125T095235.000Z-000000".into(),
        disk_size: size,
        source: manifest::SourceInfo::default(),
        transport: "file".into(),
        started: String::new(),
        finished: String::new(),
        chunking: manifest::ChunkingInfo {
            kind: manifest::ChunkingKind::Fixed,
            block_size: 1 << 20,
        },
        compression: "none".into(),
        parent: None,
        stats: manifest::PointStats::default(),
        cbt: None,
        checkpoint: None,
        consistency: None,
        vm_definition: None,
    };
    w.finish(&meta).expect("finish")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = FrameHeader::parse(&b);
        let mut dec = FrameDecoder::new().expect("dec");
        prop_assert_eq!(dec.decode(&b, None).is_ok(), dec.check(&b, None).is_ok());
        let _ = index::decode(&b);
        let _ = manifest::decode(&b);
        let _ = pack::check_header(&b);
        if b.len() >= manifest::FOOTER_LEN {
            let _ = manifest::parse_footer(&b[b.len() - manifest::FOOTER_LEN..]);
        }
    }

    #[test]
    fn any_bit_flip_in_a_frame_is_caught(data in proptest::collection::vec(any::<u8>(), 1..3000),
                                          compress in any::<bool>(), bit in any::<usize>()) {
        let (id, mut f) = valid_frame(&data, compress.then_some(3));
        let bit = bit % (f.len() * 8);
        f[bit / 8] ^= 1 << (bit % 8);
        // Either detected, or (impossible by design) the exact original data.
        match FrameDecoder::new().expect("dec").decode(&f, Some(id)) {
            Err(_) => {}
            Ok(d) => prop_assert!(false, "flip at bit {bit} undetected ({} bytes)", d.len()),
        }
        // Checked without keeping the chunk (as the repository service
        // checks what it receives): caught too; the frame as written passes.
        let mut dec = FrameDecoder::new().expect("dec");
        prop_assert!(dec.check(&f, Some(id)).is_err(), "check: flip at bit {bit} undetected");
        prop_assert_eq!(dec.check(&valid_frame(&data, compress.then_some(3)).1, Some(id)), Ok(()));
        // The same frame read in two parts (header; payload where the
        // chunk goes, as a raw chunk is read): caught too.
        let (h, payload) = f.split_at(FRAME_HEADER_LEN);
        let mut out = payload.to_vec();
        out.resize(payload.len().max(data.len()), 0);
        match FrameDecoder::new().expect("dec").decode_in_place(h, Some(id), &mut out) {
            Err(_) => {}
            Ok(n) => prop_assert!(false, "in place: flip at bit {bit} undetected ({n} bytes)"),
        }
    }

    #[test]
    fn a_frame_read_in_two_parts_decodes_to_its_chunk(data in proptest::collection::vec(any::<u8>(), 1..3000),
                                                      compress in any::<bool>()) {
        let (id, f) = valid_frame(&data, compress.then_some(3));
        let (h, payload) = f.split_at(FRAME_HEADER_LEN);
        let mut out = payload.to_vec();
        out.resize(payload.len().max(data.len()), 0);
        let n = FrameDecoder::new().expect("dec").decode_in_place(h, Some(id), &mut out).expect("decodes");
        prop_assert_eq!(&out[..n], &data[..]);
        // A payload beyond the buffer is an error, not a panic.
        let mut short = vec![0u8; payload.len() - 1];
        prop_assert!(FrameDecoder::new().expect("dec").decode_in_place(h, Some(id), &mut short).is_err());
    }

    #[test]
    fn mutated_manifests_fail_cleanly(n in 1usize..40, pos in any::<usize>(), val in any::<u8>(), cut in any::<bool>()) {
        let mut b = valid_manifest(n);
        prop_assert!(manifest::decode(&b).is_ok());
        let p = pos % b.len();
        if cut { b.truncate(p); } else if b[p] != val { b[p] = val; } else { return Ok(()); }
        prop_assert!(manifest::decode(&b).is_err(), "mutation at {p} accepted");
    }

    #[test]
    fn mutated_indexes_fail_cleanly(n in 0usize..30, pos in any::<usize>(), val in any::<u8>()) {
        let packs = [datamover::PackId([1; 16])];
        let mut es: Vec<_> = (0..n).map(|i| index::IndexEntry {
            id: ChunkId([i as u8; 32]), pack: 0, offset: i as u32, frame_len: 60, plain_len: 8,
        }).collect();
        let mut b = index::encode(&packs, &mut es);
        let p = pos % b.len();
        if b[p] == val { return Ok(()); }
        b[p] = val;
        prop_assert!(index::decode(&b).is_err(), "mutation at {p} accepted");
    }
}

#[test]
fn huge_declared_lengths_do_not_allocate() {
    // A frame header claiming 4 GiB payload is refused before allocation.
    let (_, mut f) = valid_frame(b"abc", None);
    f[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(FrameHeader::parse(&f).is_err());
    // An index claiming 2^60 entries is refused by its size arithmetic.
    let mut b = index::encode(&[], &mut []);
    b[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(index::decode(&b).is_err());
    // A manifest footer claiming 2^40 extents and a 4 GiB meta is refused.
    let mut m = valid_manifest(3);
    let l = m.len();
    m[l - 32..l - 24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(manifest::decode(&m).is_err());
    m[l - 16..l - 12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(manifest::decode(&m).is_err());
}
