//! Property tests of the TCP frame codec.
#![cfg(feature = "tcp")]

use bytes::BytesMut;
use palisade::rpc::transport::tcp::JsonFrameCodec;
use proptest::prelude::*;
use serde_json::Value;
use tokio_util::codec::{Decoder, Encoder};

fn json_texts() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(Value::from),
        // ASCII, Latin, CJK, emoji (two UTF-16 units), combining marks.
        "[a-z \"\\\\]{0,5}|[é€日本😀🚀👍🏽\u{301}]{0,4}".prop_map(Value::from),
        Just(Value::Null),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(("[a-zé😀]{1,4}", inner), 0..5)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
    .prop_map(|value| value.to_string())
}

/// Splits `bytes` at the given cut points (sorted, deduplicated, within bounds).
fn chunks(bytes: &[u8], mut cuts: Vec<usize>) -> Vec<&[u8]> {
    cuts.iter_mut().for_each(|c| *c %= bytes.len().max(1));
    cuts.sort_unstable();
    cuts.dedup();
    let mut pieces = Vec::new();
    let mut start = 0;
    for cut in cuts {
        if cut > start {
            pieces.push(&bytes[start..cut]);
            start = cut;
        }
    }
    pieces.push(&bytes[start..]);
    pieces
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn any_frames_cut_anywhere_decode_to_the_same_frames(
        texts in prop::collection::vec(json_texts(), 1..12),
        cuts in prop::collection::vec(any::<usize>(), 0..40),
    ) {
        let mut codec = JsonFrameCodec::new(1 << 20);
        let mut stream = BytesMut::new();
        for text in &texts {
            codec.encode(bytes::Bytes::from(text.clone()), &mut stream).unwrap();
        }
        let mut decoder = JsonFrameCodec::new(1 << 20);
        let mut buffer = BytesMut::new();
        let mut decoded = Vec::new();
        for piece in chunks(&stream, cuts) {
            buffer.extend_from_slice(piece);
            while let Some(frame) = decoder.decode(&mut buffer).unwrap() {
                decoded.push(String::from_utf8(frame.to_vec()).unwrap());
            }
        }
        prop_assert_eq!(decoded, texts);
        prop_assert!(buffer.is_empty());
        prop_assert!(!decoder.is_mid_frame());
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        prefix in "[0-9]{0,4}#?",
        cuts in prop::collection::vec(any::<usize>(), 0..20),
    ) {
        let mut input = prefix.into_bytes();
        input.extend_from_slice(&bytes);
        let mut decoder = JsonFrameCodec::new(256);
        let mut buffer = BytesMut::new();
        'feed: for piece in chunks(&input, cuts) {
            buffer.extend_from_slice(piece);
            loop {
                match decoder.decode(&mut buffer) {
                    Ok(Some(frame)) => prop_assert!(std::str::from_utf8(&frame).is_ok()),
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
        }
    }
}
