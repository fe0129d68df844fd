use super::*;

fn native_stream(n: usize, final_line: bool) -> String {
    let mut s = String::new();
    for i in 1..=n {
        s.push_str(&format!(
            r#"{{"model":"llama3.2","created_at":"2026-01-01T00:00:00Z","message":{{"role":"assistant","content":"tok{i} "}},"done":false}}"#
        ));
        s.push('\n');
    }
    if final_line {
        s.push_str(r#"{"model":"llama3.2","created_at":"2026-01-01T00:00:00Z","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","total_duration":123,"prompt_eval_count":17,"eval_count":"#);
        s.push_str(&format!("{n}}}\n"));
    }
    s
}

fn sse(events: &[String]) -> String {
    events.iter().map(|e| format!("data: {e}\n\n")).collect()
}

fn chat_sse(n: usize, usage: bool, done: bool) -> String {
    let mut ev = vec![r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#.to_string()];
    for i in 1..=n {
        ev.push(format!(r#"{{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{{"index":0,"delta":{{"role":"assistant","content":"tok{i} "}},"finish_reason":null}}]}}"#));
    }
    if done {
        ev.push(r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#.to_string());
        if usage {
            ev.push(format!(r#"{{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[],"usage":{{"prompt_tokens":9,"completion_tokens":{n},"total_tokens":{}}}}}"#, 9 + n));
        }
    }
    let mut s = sse(&ev);
    if done {
        s.push_str("data: [DONE]\n\n");
    }
    s
}

fn completions_sse(n: usize, done: bool) -> String {
    let zero = r#""usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}"#;
    let mut ev: Vec<String> = (1..=n)
        .map(|i| format!(r#"{{"id":"cmpl-1","object":"text_completion","choices":[{{"text":"tok{i} ","index":0,"finish_reason":null}}],{zero}}}"#))
        .collect();
    if done {
        ev.push(format!(r#"{{"id":"cmpl-1","object":"text_completion","choices":[{{"text":"","index":0,"finish_reason":"stop"}}],{zero}}}"#));
        ev.push(format!(r#"{{"id":"cmpl-1","object":"text_completion","choices":[],"usage":{{"prompt_tokens":5,"completion_tokens":{n},"total_tokens":{}}}}}"#, n + 5));
    }
    let mut s = sse(&ev);
    if done {
        s.push_str("data: [DONE]\n\n");
    }
    s
}

fn responses_sse(n: usize, done: bool) -> String {
    let mut s = String::from(
        "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\"}}\n\n",
    );
    for i in 1..=n {
        s.push_str(&format!(
            "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"delta\":\"tok{i} \"}}\n\n"
        ));
    }
    if done {
        s.push_str(&format!(
            "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"resp_1\",\"status\":\"completed\",\"usage\":{{\"input_tokens\":4,\"output_tokens\":{n},\"total_tokens\":{}}}}}}}\n\n",
            n + 4
        ));
    }
    s
}

fn scan(format: Format, body: &[u8], cuts: &[usize]) -> Outcome {
    let mut s = UsageScanner::new(format, false);
    let mut last = 0;
    for &c in cuts.iter().chain(std::iter::once(&body.len())) {
        s.observe(&body[last..c]);
        last = c;
    }
    s.finish(100)
}

#[test]
fn native_stream_counts_come_from_the_done_line() {
    let o = scan(Format::Native, native_stream(8, true).as_bytes(), &[]);
    assert_eq!(
        o.usage,
        Usage {
            prompt_tokens: 17,
            completion_tokens: 8
        }
    );
    assert!(o.reported && o.completed && !o.in_band_error);
    assert_eq!(o.content_chunks, 8);
}

#[test]
fn cut_streams_are_estimated_from_what_was_seen() {
    let o = scan(Format::Native, native_stream(5, false).as_bytes(), &[]);
    assert_eq!(
        o.usage,
        Usage {
            prompt_tokens: 25,
            completion_tokens: 5
        }
    );
    assert!(!o.reported && !o.completed);
    // a partial line at the end is not a chunk
    let mut body = native_stream(3, false);
    body.push_str(r#"{"model":"llama3.2","message":{"content":"tok"#);
    assert_eq!(
        scan(Format::Native, body.as_bytes(), &[])
            .usage
            .completion_tokens,
        3
    );
}

#[test]
fn in_band_errors_are_failures_and_still_charged() {
    let mut body = native_stream(4, false);
    body.push_str("{\"error\":\"simulated upstream failure\"}\n");
    let o = scan(Format::Native, body.as_bytes(), &[]);
    assert!(o.in_band_error && !o.completed);
    assert_eq!(o.usage.completion_tokens, 4);
}

#[test]
fn native_json_and_embeddings() {
    let body = br#"{"model":"m","message":{"role":"assistant","content":"a b c"},"done":true,"prompt_eval_count":3,"eval_count":12}"#;
    let o = scan(Format::Native, body, &[]);
    assert_eq!(
        o.usage,
        Usage {
            prompt_tokens: 3,
            completion_tokens: 12
        }
    );
    let embed =
        br#"{"model":"e","embeddings":[[0.1,-0.2,3e-5]],"total_duration":5,"prompt_eval_count":6}"#;
    assert_eq!(
        scan(Format::Native, embed, &[]).usage,
        Usage {
            prompt_tokens: 6,
            completion_tokens: 0
        }
    );
    let legacy = br#"{"embedding":[0.5,0.25]}"#;
    let mut s = UsageScanner::new(Format::Native, true);
    s.observe(legacy);
    let o = s.finish(40);
    assert_eq!(
        o.usage,
        Usage {
            prompt_tokens: 10,
            completion_tokens: 0
        }
    );
    assert!(!o.reported);
}

#[test]
fn openai_sse_takes_the_final_usage_event_only() {
    let o = scan(Format::OpenAiSse, chat_sse(8, true, true).as_bytes(), &[]);
    assert_eq!(
        o.usage,
        Usage {
            prompt_tokens: 9,
            completion_tokens: 8
        }
    );
    assert!(o.reported && o.completed);
    assert_eq!(o.content_chunks, 8);
    let o = scan(Format::OpenAiSse, chat_sse(6, false, true).as_bytes(), &[]);
    assert!(!o.reported && o.completed);
    assert_eq!(o.usage.completion_tokens, 6);
    let o = scan(Format::OpenAiSse, chat_sse(3, true, false).as_bytes(), &[]);
    assert!(!o.completed);
    assert_eq!(o.usage.completion_tokens, 3);
}

#[test]
fn completions_zeroed_usage_is_never_taken() {
    let o = scan(Format::OpenAiSse, completions_sse(7, true).as_bytes(), &[]);
    assert_eq!(
        o.usage,
        Usage {
            prompt_tokens: 5,
            completion_tokens: 7
        }
    );
    let cut = scan(Format::OpenAiSse, completions_sse(4, false).as_bytes(), &[]);
    assert!(!cut.reported, "zeroed per-chunk usage is not a count");
    assert_eq!(cut.usage.completion_tokens, 4);
}

#[test]
fn responses_sse_and_json() {
    let o = scan(Format::ResponsesSse, responses_sse(5, true).as_bytes(), &[]);
    assert_eq!(
        o.usage,
        Usage {
            prompt_tokens: 4,
            completion_tokens: 5
        }
    );
    assert!(o.completed);
    let cut = scan(
        Format::ResponsesSse,
        responses_sse(2, false).as_bytes(),
        &[],
    );
    assert_eq!((cut.reported, cut.usage.completion_tokens), (false, 2));
    let json = br#"{"id":"chatcmpl-1","choices":[{"message":{"content":"x","tool_calls":[{"function":{"arguments":"{\"prompt_tokens\":99}"}}]}}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
    assert_eq!(
        scan(Format::OpenAiJson, json, &[]).usage,
        Usage {
            prompt_tokens: 3,
            completion_tokens: 4
        }
    );
    let resp = br#"{"id":"resp_1","output":[],"usage":{"input_tokens":2,"output_tokens":8,"total_tokens":10}}"#;
    assert_eq!(
        scan(Format::OpenAiJson, resp, &[]).usage,
        Usage {
            prompt_tokens: 2,
            completion_tokens: 8
        }
    );
}

#[test]
fn crlf_framing_and_comments() {
    let body = chat_sse(3, true, true).replace('\n', "\r\n");
    let body = format!(": keep-alive\r\n\r\n{body}");
    let o = scan(Format::OpenAiSse, body.as_bytes(), &[]);
    assert_eq!(
        o.usage,
        Usage {
            prompt_tokens: 9,
            completion_tokens: 3
        }
    );
    assert!(o.completed);
}

/// xorshift: deterministic "random" chunkings without a dependency.
fn cuts(seed: u64, len: usize, count: usize) -> Vec<usize> {
    let mut x = seed | 1;
    let mut v: Vec<usize> = (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as usize) % (len + 1)
        })
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn data_fields_without_a_space_read_the_same() {
    let spaced = chat_sse(5, true, true);
    let tight = spaced.replace("data: ", "data:");
    let outcome = scan(Format::OpenAiSse, tight.as_bytes(), &[]);
    assert_eq!(outcome, scan(Format::OpenAiSse, spaced.as_bytes(), &[]));
    assert!(outcome.reported && outcome.completed, "{outcome:?}");
}

#[test]
fn every_chunking_gives_the_same_outcome() {
    let samples: Vec<(Format, String)> = vec![
        (Format::Native, native_stream(6, true)),
        (Format::Native, native_stream(6, false)),
        (Format::OpenAiSse, chat_sse(5, true, true)),
        (
            Format::OpenAiSse,
            chat_sse(5, false, true).replace('\n', "\r\n"),
        ),
        (Format::OpenAiSse, completions_sse(4, true)),
        // `data:` without its optional space.
        (
            Format::OpenAiSse,
            chat_sse(5, true, true).replace("data: ", "data:"),
        ),
        (Format::ResponsesSse, responses_sse(3, true)),
        (
            Format::OpenAiJson,
            r#"{"usage":{"prompt_tokens":31,"completion_tokens":415}}"#.to_string(),
        ),
    ];
    for (format, body) in samples {
        let b = body.as_bytes();
        let whole = scan(format, b, &[]);
        for i in 0..=b.len() {
            assert_eq!(scan(format, b, &[i]), whole, "{format:?} cut at {i}");
        }
        for seed in 1..300u64 {
            let c = cuts(seed, b.len(), 1 + (seed as usize % 40));
            assert_eq!(scan(format, b, &c), whole, "{format:?} cuts {c:?}");
        }
        // byte by byte
        let all: Vec<usize> = (1..b.len()).collect();
        assert_eq!(scan(format, b, &all), whole, "{format:?} byte by byte");
    }
}

/// The native fast path (`plain_line`) takes a line only when it lies whole in one chunk: fed
/// whole, most lines of these streams take it; fed byte by byte, none does. Lines are built
/// from fragments that are plain, that carry what accounting reads, or that are malformed, so
/// both answers of the fast path's test meet the walker's reading of the same bytes.
#[test]
fn the_native_fast_path_reads_lines_as_the_walker_does() {
    const PARTS: &[&str] = &[
        r#"{"model":"m","message":{"role":"assistant","content":"tok "},"done":false}"#,
        r#"{"model":"m","response":"a \"done\" \\ b\n","done":false}"#,
        r#"{"model":"m","message":{"tool_calls":[{"function":{"arguments":{"done":true,"error":"x"}}}]},"done":false}"#,
        r#"{"model":"m","done":true,"prompt_eval_count":7,"eval_count":5}"#,
        r#"{"done":false,"eval_count":2}"#,
        r#"{"done",true}"#,
        r#"{"error":"model failed"}"#,
        r#"{"type":"error"}"#,
        r#"{"usage":{"prompt_tokens":4,"completion_tokens":9}}"#,
        r#"{"a":1}{"b":2}"#,
        r#"{"a":{"b":1}"#,
        r#"}"#,
        r#"{"a":"open"#,
        r#"{"a":"esc\"#,
        r#"{"done": false}"#,
        // The walker is no grammar check: a bare word after `false` is read as another value
        // of `done`, and its `t` as `true`.
        r#"{"done":false role":"assistant"}"#,
        r#"{"done":false,tru}"#,
        r#" {"x":[1,2]}"#,
        r#"{"x":tru}"#,
        "",
        "\r",
        "  ",
    ];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x as usize) % n
    };
    let mut fast_lines = 0;
    for _ in 0..3000 {
        let lines = 1 + next(6);
        let mut body = String::new();
        for _ in 0..lines {
            let part = PARTS[next(PARTS.len())];
            fast_lines += usize::from(crate::accounting::plain_line::is_plain_frame(
                part.as_bytes(),
            ));
            body.push_str(part);
            if next(5) != 0 {
                body.push('\n');
            }
        }
        let b = body.as_bytes();
        let whole = scan(Format::Native, b, &[]);
        let all: Vec<usize> = (1..b.len()).collect();
        assert_eq!(scan(Format::Native, b, &all), whole, "{body:?}");
        let c = cuts(next(1 << 30) as u64, b.len(), 1 + next(4));
        assert_eq!(scan(Format::Native, b, &c), whole, "{body:?} cut at {c:?}");
    }
    assert!(fast_lines > 1000, "the fast path was taken ({fast_lines})");
}
