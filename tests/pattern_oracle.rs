//! Pattern normalisation checked against NestJS itself: thousands of generated patterns are routed
//! by palisade and by `@nestjs/microservices` (run in Node), and must agree byte for byte — both
//! `transformPatternToRoute` (what handlers register under) and the route a Nest server dispatches
//! a received pattern on.

mod support;

use palisade::rpc::{Pattern, RawJson};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{Map, Value};
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

fn keys() -> impl Strategy<Value = String> {
    // ASCII punctuation, digits, both cases, spaces and ignorable control characters.
    prop_oneof![
        4 => "[a-zA-Z]{1,6}",
        2 => "[a-z_\\-.:0-9 ]{1,5}",
        2 => "[!-~]{1,4}",
        1 => "[0-9]{1,3}",
        1 => "[a-b\u{1}\u{7}]{1,3}",
    ]
}

fn scalars() -> impl Strategy<Value = Value> {
    prop_oneof![
        "[ -~]{0,8}".prop_map(Value::from),
        "[a\"\\\\é😀]{0,4}".prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e30f64..1e30).prop_map(Value::from),
        (-1e-5f64..1e-5).prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        Just(Value::Null),
    ]
}

fn patterns() -> impl Strategy<Value = Value> {
    let leaf = scalars();
    let nested = leaf.prop_recursive(8, 64, 24, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..13).prop_map(Value::Array),
            prop::collection::btree_map(keys(), inner, 0..23)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    });
    prop_oneof![
        4 => prop::collection::btree_map(keys(), nested.clone(), 1..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        1 => nested,
        1 => "[ -~]{0,10}".prop_map(Value::from),
        1 => Just(Value::from(r#"{"role":"math","cmd":"sum"}"#)),
    ]
}

#[test]
fn routes_agree_with_nestjs() {
    let mut runner = TestRunner::deterministic();
    let strategy = patterns();
    let samples: Vec<Value> = (0..3000)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect();

    let mut node = support::nestjs::node("route.js")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run node");
    let mut stdin = node.stdin.take().unwrap();
    let input: String = samples.iter().map(|p| format!("{p}\n")).collect();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let answers: Vec<Value> = BufReader::new(node.stdout.take().unwrap())
        .lines()
        .map(|line| serde_json::from_str(&line.unwrap()).unwrap())
        .collect();
    writer.join().unwrap().unwrap();
    assert!(node.wait().unwrap().success());
    assert_eq!(answers.len(), samples.len());

    let mut compared = 0;
    for (pattern, answer) in samples.iter().zip(&answers) {
        if let Some(route) = answer["route"].as_str() {
            assert_eq!(
                Pattern::from(pattern.clone()).route(),
                route,
                "registration route of {pattern}"
            );
            compared += 1;
        }
        let raw = RawJson::to_json(pattern).unwrap();
        assert_eq!(
            Pattern::incoming_route(&raw).as_deref(),
            answer["incoming"].as_str(),
            "dispatch route of {pattern}"
        );
    }
    assert!(
        compared > 2500,
        "only {compared} patterns had a string route"
    );
}
