//! For any valid TCP super-frame the fuzzer shapes (payload, options, flags, MSS), cutting it
//! into segments and coalescing them again gives back the same bytes (the checksum fields
//! aside), and re-cutting that gives the same segments: the property of issue 4.
#![no_main]

use dataplane::offload::{Coalescer, TcpSegment};
use dataplane::segment::SuperFrame;
use dataplane::wire::checksum;
use libfuzzer_sys::fuzz_target;

fn super_frame(payload: &[u8], options: usize, psh: bool, seq: u32) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    let tcp_len = 20 + options;
    let total = (20 + tcp_len + payload.len()) as u16;
    f.extend_from_slice(&[0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51]);
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, ((tcp_len / 4) as u8) << 4, if psh { 0x18 } else { 0x10 }, 0xff, 0xff, 0, 0, 0, 0]);
    f.extend(std::iter::repeat_n(1u8, options));
    f.extend_from_slice(payload);
    f
}

fn cut(frame: &[u8], mss: usize) -> Vec<Vec<u8>> {
    SuperFrame::parse(frame).unwrap().to_segments(mss)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let mss = 256 + usize::from(u16::from_be_bytes([data[0], data[1]])) % 8800;
    let options = usize::from(data[2] % 11) * 4;
    let psh = data[3] & 1 == 1;
    let seq = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
    let payload = &data[8..data.len().min(8 + 60_000)];
    if payload.is_empty() {
        return;
    }
    let original = super_frame(payload, options, psh, seq);
    let segs = cut(&original, mss);
    let mut first = segs[0].clone();
    let mut run = Coalescer::new(TcpSegment::parse(&first).expect("a cut segment is coalescable"));
    let mut rebuilt_payload = Vec::new();
    for s in &segs[1..] {
        let seg = TcpSegment::parse(s).expect("a cut segment is coalescable");
        assert!(run.try_push(&first, s, &seg), "consecutive segments rejoin");
        rebuilt_payload.extend_from_slice(&s[seg.payload_offset()..]);
    }
    let hdr = run.finish(&mut first);
    first.extend_from_slice(&rebuilt_payload);
    assert_eq!(first.len(), original.len());
    let csum = 14 + 20 + 16;
    for (i, (a, b)) in first.iter().zip(&original).enumerate() {
        if i != 24 && i != 25 && i != csum && i != csum + 1 {
            assert_eq!(a, b, "byte {i}");
        }
    }
    if segs.len() > 1 {
        let c = !checksum::fold(checksum::sum(&first[34..], 0));
        first[csum..csum + 2].copy_from_slice(&c.to_be_bytes());
        assert_eq!(cut(&first, usize::from(hdr.gso_size)), segs);
    }
});
