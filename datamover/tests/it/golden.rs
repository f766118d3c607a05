//! Golden bytes of the on-disk formats. If one of these fails, a format
//! changed: bump its version and keep a reader for the old one instead.
use datamover::format::frame::{Codec, FrameDecoder, FrameEncoder, FrameHeader};
use datamover::format::index::{self, IndexEntry};
use datamover::format::manifest::{
    self, CbtMeta, ChunkingInfo, ChunkingKind, Extent, ManifestWriter, PointMeta, PointStats,
    SourceInfo,
};
use datamover::ids::PackId;
use datamover::{ChunkId, Consistency, ConsistencyLevel};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn frame_raw_golden() {
    let plain = b"hello, datamover";
    let id = ChunkId::of(plain);
    assert_eq!(hex(&id.0), GOLDEN_ID, "BLAKE3-256 of the plain bytes");
    let mut out = Vec::new();
    let codec = FrameEncoder::new(None)
        .expect("enc")
        .encode_into(id, plain, &mut out)
        .expect("encode");
    assert_eq!(codec, Codec::Raw);
    let expect = [
        "444d4346",
        "01",
        "00",
        "0000",
        "10000000",
        "10000000", // magic, version, codec, reserved, lengths
        GOLDEN_ID,
        GOLDEN_RAW_CRC,
        "68656c6c6f2c20646174616d6f766572", // id, crc, payload
    ]
    .concat();
    assert_eq!(hex(&out), expect);
    let back = FrameDecoder::new()
        .expect("dec")
        .decode(&out, Some(id))
        .expect("decode");
    assert_eq!(back, plain);
}

const GOLDEN_ID: &str = "845ab1091bd0e850676086c16f96e83feca11065c1e7c51e4bed4d7d19e97314";
const GOLDEN_RAW_CRC: &str = "30a53000";

#[test]
fn frame_zstd_decodes_and_header_is_stable() {
    let plain = vec![b'a'; 4096];
    let id = ChunkId::of(&plain);
    let mut out = Vec::new();
    let codec = FrameEncoder::new(Some(3))
        .expect("enc")
        .encode_into(id, &plain, &mut out)
        .expect("encode");
    assert_eq!(codec, Codec::Zstd);
    let h = FrameHeader::parse(&out).expect("parse");
    assert_eq!((h.codec, h.plain_len, h.id), (Codec::Zstd, 4096, id));
    assert_eq!(&out[..8], b"DMCF\x01\x01\x00\x00");
    assert_eq!(
        FrameDecoder::new()
            .expect("dec")
            .decode(&out, Some(id))
            .expect("decode"),
        plain
    );
    // A frame stored by an earlier build (pinned bytes) still decodes.
    let old = hex_to_bytes(GOLDEN_ZSTD_FRAME);
    assert_eq!(
        FrameDecoder::new()
            .expect("dec")
            .decode(&old, Some(id))
            .expect("old frame"),
        plain
    );
}

const GOLDEN_ZSTD_FRAME: &str = "444d4346010100000010000012000000cf657d3fd42311a258afdf3b5261c256983e3deb2bb38980cb0e754db903d549dd242ffc28b52ffd00584d00001061610100fbf70116";

fn hex_to_bytes(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap_or(0))
        .collect()
}

fn sample_meta() -> PointMeta {
    PointMeta {
        name: "web01/vda".into(),
        point: "20261125T095235.000Z-1a2b3c".into(),
        disk_size: 3 << 20,
        source: SourceInfo {
            kind: "file".into(),
            location: "/images/web01.raw".into(),
        },
        transport: "file".into(),
        started: "2026-11-25T09:52:35.000Z".into(),
        finished: "2026-11-25T09:52:36.500Z".into(),
        chunking: ChunkingInfo {
            kind: ChunkingKind::Cdc,
            block_size: 1 << 20,
        },
        compression: "optimal".into(),
        parent: None,
        stats: PointStats {
            bytes_read: 1 << 20,
            bytes_zero: 2 << 20,
            bytes_new: 1 << 20,
            bytes_stored: 4096,
            chunks: 1,
            chunks_new: 1,
            seconds: 1.5,
            bottleneck: "CPU".into(),
        },
        cbt: None,
        checkpoint: None,
        consistency: None,
        vm_definition: None,
    }
}

/// The metadata of an incremental point: `parent` and `cbt` filled in.
/// Full points never write a `cbt` key (their bytes are pinned above).
#[test]
fn incremental_meta_golden() {
    let mut m = sample_meta();
    m.parent = Some("20261124T095235.000Z-0a0b0c".into());
    m.cbt = Some(CbtMeta {
        tracker: "qemu:dirty-bitmap:b0".into(),
        bytes_changed: 65536,
    });
    let json = serde_json::to_string(&m).expect("json");
    assert_eq!(json, GOLDEN_INCREMENTAL_META);
    let back: PointMeta = serde_json::from_str(GOLDEN_INCREMENTAL_META).expect("parse");
    assert_eq!(back, m);
    // A reader of this version still reads metas written before `cbt` existed.
    let old: PointMeta = serde_json::from_str(GOLDEN_META).expect("parse");
    assert_eq!(old.cbt, None);
}

/// A point read from a running VM: the transport mode used, and the
/// checkpoint (dirty bitmap) started when its data was frozen.
#[test]
fn vm_checkpoint_meta_golden() {
    let mut m = sample_meta();
    m.source = datamover::format::manifest::SourceInfo {
        kind: "vm".into(),
        location: "qmp+unix:///run/web01.qmp#vda".into(),
    };
    m.transport = "hotadd".into();
    m.parent = Some("20261124T095235.000Z-0a0b0c".into());
    m.cbt = Some(CbtMeta {
        tracker: "qemu:dirty-bitmap:dm-cp-19abb5b6b58-1f2e".into(),
        bytes_changed: 65536,
    });
    m.checkpoint = Some("dm-cp-19abc7fe158-3c4d".into());
    let json = serde_json::to_string(&m).expect("json");
    assert_eq!(json, GOLDEN_VM_META);
    let back: PointMeta = serde_json::from_str(GOLDEN_VM_META).expect("parse");
    assert_eq!(back, m);
    // Points written before checkpoints existed read as having none.
    let old: PointMeta = serde_json::from_str(GOLDEN_INCREMENTAL_META).expect("parse");
    assert_eq!(old.checkpoint, None);
}

/// A point of a running guest records its consistency: `application`
/// with the time the guest was frozen, or `crash` and why.
#[test]
fn consistency_meta_golden() {
    let mut m: PointMeta = serde_json::from_str(GOLDEN_VM_META).expect("parse");
    m.consistency = Some(Consistency {
        level: ConsistencyLevel::Application,
        reason: "the guest agent froze 1 filesystem".into(),
        frozen_ms: Some(412),
    });
    let json = serde_json::to_string(&m).expect("json");
    assert_eq!(json, GOLDEN_APPLICATION_META);
    let back: PointMeta = serde_json::from_str(GOLDEN_APPLICATION_META).expect("parse");
    assert_eq!(back, m);
    m.consistency = Some(Consistency::crash("no guest agent answered in 10 s"));
    let json = serde_json::to_string(&m).expect("json");
    assert_eq!(json, GOLDEN_CRASH_META);
    let back: PointMeta = serde_json::from_str(GOLDEN_CRASH_META).expect("parse");
    assert_eq!(back, m);
    // Points written before consistency was recorded read as unknown.
    let old: PointMeta = serde_json::from_str(GOLDEN_VM_META).expect("parse");
    assert_eq!(old.consistency, None);
}

/// A libvirt domain's point stores the domain's XML.
#[test]
fn vm_definition_meta_golden() {
    let mut m: PointMeta = serde_json::from_str(GOLDEN_CRASH_META).expect("parse");
    m.vm_definition = Some("<domain type='kvm'><name>web01</name></domain>".into());
    let json = serde_json::to_string(&m).expect("json");
    assert_eq!(json, GOLDEN_DEFINITION_META);
    let back: PointMeta = serde_json::from_str(GOLDEN_DEFINITION_META).expect("parse");
    assert_eq!(back, m);
    let old: PointMeta = serde_json::from_str(GOLDEN_CRASH_META).expect("parse");
    assert_eq!(old.vm_definition, None);
}

#[test]
fn manifest_golden() {
    let id = ChunkId([0x11; 32]);
    let mut w = ManifestWriter::new(Vec::new()).expect("writer");
    w.push(Extent::Zero { len: 1 << 20 }).expect("push");
    w.push(Extent::Chunk { id, len: 1 << 20 }).expect("push");
    w.push(Extent::Zero { len: 512 << 10 }).expect("push");
    w.push(Extent::Zero { len: 512 << 10 }).expect("push"); // merged with the previous
    let bytes = w.finish(&sample_meta()).expect("finish");
    let body = concat!(
        "444d5054",
        "01000000",
        "0000000000000000", // header
        "02",
        "0000100000000000", // zero 1 MiB
        "01",
        "00001000",
        "1111111111111111111111111111111111111111111111111111111111111111", // chunk
        "02",
        "0000100000000000", // zero 1 MiB (merged)
        "00"                // end
    );
    assert_eq!(hex(&bytes[..body.len() / 2]), body);
    let meta_len = bytes.len() - body.len() / 2 - manifest::FOOTER_LEN;
    let meta =
        std::str::from_utf8(&bytes[body.len() / 2..body.len() / 2 + meta_len]).expect("utf8");
    assert_eq!(meta, GOLDEN_META);
    let footer = &bytes[bytes.len() - manifest::FOOTER_LEN..];
    assert_eq!(
        hex(&footer[..20]),
        format!(
            "0300000000000000{}{}",
            "0000300000000000",
            hex(&(meta_len as u32).to_le_bytes())
        )
    );
    assert_eq!(&footer[28..], b"DMPE");
    assert_eq!(hex(&footer[20..28]), GOLDEN_FOOTER_CRCS);
    let m = manifest::decode(&bytes).expect("decode");
    assert_eq!(m.meta, sample_meta());
    assert_eq!(m.extents.len(), 3);
}

const GOLDEN_META: &str = r#"{"name":"web01/vda","point":"20261125T095235.000Z-1a2b3c","disk_size":3145728,"source":{"kind":"file","location":"/images/web01.raw"},"transport":"file","started":"2026-11-25T09:52:35.000Z","finished":"2026-11-25T09:52:36.500Z","chunking":{"kind":"cdc","block_size":1048576},"compression":"optimal","parent":null,"stats":{"bytes_read":1048576,"bytes_zero":2097152,"bytes_new":1048576,"bytes_stored":4096,"chunks":1,"chunks_new":1,"seconds":1.5,"bottleneck":"CPU"}}"#;
const GOLDEN_INCREMENTAL_META: &str = r#"{"name":"web01/vda","point":"20261125T095235.000Z-1a2b3c","disk_size":3145728,"source":{"kind":"file","location":"/images/web01.raw"},"transport":"file","started":"2026-11-25T09:52:35.000Z","finished":"2026-11-25T09:52:36.500Z","chunking":{"kind":"cdc","block_size":1048576},"compression":"optimal","parent":"20261124T095235.000Z-0a0b0c","stats":{"bytes_read":1048576,"bytes_zero":2097152,"bytes_new":1048576,"bytes_stored":4096,"chunks":1,"chunks_new":1,"seconds":1.5,"bottleneck":"CPU"},"cbt":{"tracker":"qemu:dirty-bitmap:b0","bytes_changed":65536}}"#;
const GOLDEN_VM_META: &str = r#"{"name":"web01/vda","point":"20261125T095235.000Z-1a2b3c","disk_size":3145728,"source":{"kind":"vm","location":"qmp+unix:///run/web01.qmp#vda"},"transport":"hotadd","started":"2026-11-25T09:52:35.000Z","finished":"2026-11-25T09:52:36.500Z","chunking":{"kind":"cdc","block_size":1048576},"compression":"optimal","parent":"20261124T095235.000Z-0a0b0c","stats":{"bytes_read":1048576,"bytes_zero":2097152,"bytes_new":1048576,"bytes_stored":4096,"chunks":1,"chunks_new":1,"seconds":1.5,"bottleneck":"CPU"},"cbt":{"tracker":"qemu:dirty-bitmap:dm-cp-19abb5b6b58-1f2e","bytes_changed":65536},"checkpoint":"dm-cp-19abc7fe158-3c4d"}"#;
const GOLDEN_APPLICATION_META: &str = r#"{"name":"web01/vda","point":"20261125T095235.000Z-1a2b3c","disk_size":3145728,"source":{"kind":"vm","location":"qmp+unix:///run/web01.qmp#vda"},"transport":"hotadd","started":"2026-11-25T09:52:35.000Z","finished":"2026-11-25T09:52:36.500Z","chunking":{"kind":"cdc","block_size":1048576},"compression":"optimal","parent":"20261124T095235.000Z-0a0b0c","stats":{"bytes_read":1048576,"bytes_zero":2097152,"bytes_new":1048576,"bytes_stored":4096,"chunks":1,"chunks_new":1,"seconds":1.5,"bottleneck":"CPU"},"cbt":{"tracker":"qemu:dirty-bitmap:dm-cp-19abb5b6b58-1f2e","bytes_changed":65536},"checkpoint":"dm-cp-19abc7fe158-3c4d","consistency":{"level":"application","reason":"the guest agent froze 1 filesystem","frozen_ms":412}}"#;
const GOLDEN_CRASH_META: &str = r#"{"name":"web01/vda","point":"20261125T095235.000Z-1a2b3c","disk_size":3145728,"source":{"kind":"vm","location":"qmp+unix:///run/web01.qmp#vda"},"transport":"hotadd","started":"2026-11-25T09:52:35.000Z","finished":"2026-11-25T09:52:36.500Z","chunking":{"kind":"cdc","block_size":1048576},"compression":"optimal","parent":"20261124T095235.000Z-0a0b0c","stats":{"bytes_read":1048576,"bytes_zero":2097152,"bytes_new":1048576,"bytes_stored":4096,"chunks":1,"chunks_new":1,"seconds":1.5,"bottleneck":"CPU"},"cbt":{"tracker":"qemu:dirty-bitmap:dm-cp-19abb5b6b58-1f2e","bytes_changed":65536},"checkpoint":"dm-cp-19abc7fe158-3c4d","consistency":{"level":"crash","reason":"no guest agent answered in 10 s"}}"#;
const GOLDEN_DEFINITION_META: &str = r#"{"name":"web01/vda","point":"20261125T095235.000Z-1a2b3c","disk_size":3145728,"source":{"kind":"vm","location":"qmp+unix:///run/web01.qmp#vda"},"transport":"hotadd","started":"2026-11-25T09:52:35.000Z","finished":"2026-11-25T09:52:36.500Z","chunking":{"kind":"cdc","block_size":1048576},"compression":"optimal","parent":"20261124T095235.000Z-0a0b0c","stats":{"bytes_read":1048576,"bytes_zero":2097152,"bytes_new":1048576,"bytes_stored":4096,"chunks":1,"chunks_new":1,"seconds":1.5,"bottleneck":"CPU"},"cbt":{"tracker":"qemu:dirty-bitmap:dm-cp-19abb5b6b58-1f2e","bytes_changed":65536},"checkpoint":"dm-cp-19abc7fe158-3c4d","consistency":{"level":"crash","reason":"no guest agent answered in 10 s"},"vm_definition":"<domain type='kvm'><name>web01</name></domain>"}"#;
const GOLDEN_FOOTER_CRCS: &str = "a16d107f0a360f89";

#[test]
fn index_golden() {
    let packs = [PackId([0xaa; 16]), PackId([0xbb; 16])];
    let mut entries = vec![
        IndexEntry {
            id: ChunkId([0x22; 32]),
            pack: 1,
            offset: 8,
            frame_len: 100,
            plain_len: 200,
        },
        IndexEntry {
            id: ChunkId([0x11; 32]),
            pack: 0,
            offset: 108,
            frame_len: 52,
            plain_len: 0,
        },
    ];
    let b = index::encode(&packs, &mut entries);
    let expect = [
        "444d4958",
        "01000000",
        "02000000",
        "00000000",
        "0200000000000000",
        &"aa".repeat(16),
        &"bb".repeat(16),
        &"11".repeat(32),
        "00000000",
        "6c000000",
        "34000000",
        "00000000",
        &"22".repeat(32),
        "01000000",
        "08000000",
        "64000000",
        "c8000000",
    ]
    .concat();
    assert_eq!(hex(&b[..b.len() - 4]), expect);
    assert_eq!(hex(&b[b.len() - 4..]), GOLDEN_INDEX_CRC);
    let (p, e) = index::decode(&b).expect("decode");
    assert_eq!(p, packs);
    assert_eq!(e, entries);
}

const GOLDEN_INDEX_CRC: &str = "53ea8249";
