//! SPEC §14: no allocation per passed-through chunk. A counting global allocator measures what
//! the gateway's own per-chunk work (`response_body_filter`: the usage scanner, and the
//! usage-event filter when the gateway injected `include_usage`) allocates while a long stream
//! of realistic frames passes, chunk by chunk, after the first few chunks.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use neuronetz_gateway::accounting::usage_strip::UsageStripper;
use neuronetz_gateway::accounting::{Format, UsageScanner};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by `f` (this test binary runs one test at a time: see `main`).
fn allocations(f: impl FnOnce()) -> usize {
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    f();
    COUNTING.store(false, Ordering::SeqCst);
    ALLOCATIONS.load(Ordering::SeqCst)
}

fn ndjson_chunk(i: usize) -> Bytes {
    Bytes::from(format!(
        "{{\"model\":\"llama3.2\",\"created_at\":\"2026-11-22T10:00:00.{i:06}Z\",\"message\":{{\"role\":\"assistant\",\"content\":\"tok{i} \"}},\"done\":false}}\n"
    ))
}

fn sse_chunk(i: usize) -> Bytes {
    Bytes::from(format!(
        "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"llama3.2\",\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"tok{i} \"}},\"finish_reason\":null}}]}}\n\n"
    ))
}

fn responses_chunk(i: usize) -> Bytes {
    Bytes::from(format!(
        "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"item_id\":\"m\",\"output_index\":0,\"content_index\":0,\"delta\":\"tok{i} \"}}\n\n"
    ))
}

const CHUNKS: usize = 2000;

fn scanner_allocations(format: Format, chunk: fn(usize) -> Bytes) -> usize {
    let chunks: Vec<Bytes> = (0..CHUNKS).map(chunk).collect();
    let mut scanner = UsageScanner::new(format, false);
    // Warm-up: whatever a scanner sets up once is not per chunk.
    for c in &chunks[..10] {
        scanner.observe(c);
    }
    allocations(|| {
        for c in &chunks[10..] {
            scanner.observe(c);
        }
    })
}

fn main() {
    // One test at a time: a harness running tests on threads would count their allocations.
    let probe = allocations(|| drop(std::hint::black_box(vec![1u8; 64])));
    assert_eq!(probe, 1, "the counter sees an allocation");
    let native = scanner_allocations(Format::Native, ndjson_chunk);
    assert_eq!(native, 0, "native NDJSON scanner allocated per chunk");
    let sse = scanner_allocations(Format::OpenAiSse, sse_chunk);
    assert_eq!(sse, 0, "OpenAI SSE scanner allocated per chunk");
    let responses = scanner_allocations(Format::ResponsesSse, responses_chunk);
    assert_eq!(responses, 0, "Responses SSE scanner allocated per chunk");

    // The usage-event filter passes whole events through as the same `Bytes`.
    let chunks: Vec<Bytes> = (0..CHUNKS).map(sse_chunk).collect();
    let mut stripper = UsageStripper::new(false);
    for c in &chunks[..10] {
        let _ = stripper.push(c.clone());
    }
    let strip = allocations(|| {
        for c in &chunks[10..] {
            let out = stripper.push(c.clone());
            assert_eq!(out.len(), c.len());
        }
    });
    assert_eq!(strip, 0, "usage-event filter allocated per chunk");
    println!(
        "allocations over {} chunks after warm-up: native {native}, sse {sse}, responses {responses}, strip {strip}",
        CHUNKS - 10
    );
}
