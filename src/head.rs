//! Edits of a request or response head as plain `http` parts.
//!
//! Pingora's `insert_header` parses the name on every call (an allocation for any name outside
//! the standard set, two with the clone it keeps) and updates a second, case-preserving map
//! beside the headers: about 1 600 instructions a header, and the gateway writes a dozen per
//! request. Taken out of Pingora's type, the head is an `http` `HeaderMap` that takes constant
//! names as they are. The price is the original spelling of header names: the head goes out
//! with standard names capitalised as usual (`Content-Type`) and any other name in lower case,
//! which HTTP/1.1 does not distinguish.

use pingora::http::{RequestHeader, ResponseHeader};

/// Runs `edit` on the parts of `head` and puts them back (a non-standard reason phrase too).
pub fn edit_response<T>(
    head: &mut ResponseHeader,
    edit: impl FnOnce(&mut http::response::Parts) -> T,
) -> T {
    let reason = (head.get_reason_phrase() != head.status.canonical_reason())
        .then(|| head.get_reason_phrase().map(str::to_owned))
        .flatten();
    let empty = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts = http::response::Parts::from(std::mem::replace(head, empty));
    let result = edit(&mut parts);
    *head = ResponseHeader::from(parts);
    if let Some(reason) = reason {
        // Was valid on the way in, so it is on the way out.
        let _ = head.set_reason_phrase(Some(&reason));
    }
    result
}

/// Runs `edit` on the parts of `head` and puts them back, keeping whether an HTTP/2 request
/// ends its stream with its headers.
pub fn edit_request<T>(
    head: &mut RequestHeader,
    edit: impl FnOnce(&mut http::request::Parts) -> T,
) -> T {
    let end_stream = head.send_end_stream();
    let empty = RequestHeader::from(http::Request::new(()).into_parts().0);
    let mut parts = http::request::Parts::from(std::mem::replace(head, empty));
    let result = edit(&mut parts);
    *head = RequestHeader::from(parts);
    if let Some(end_stream) = end_stream {
        head.set_send_end_stream(end_stream);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_keeps_its_status_headers_and_reason() {
        let mut head = ResponseHeader::build(418, None).unwrap();
        head.append_header("Content-Type", "application/x-ndjson")
            .unwrap();
        head.append_header("X-Upstream", "a").unwrap();
        head.append_header("X-Upstream", "b").unwrap();
        head.set_reason_phrase(Some("Short And Stout")).unwrap();
        edit_response(&mut head, |parts| {
            parts
                .headers
                .insert("x-request-id", http::HeaderValue::from_static("r1"));
        });
        assert_eq!(head.status, 418);
        assert_eq!(head.get_reason_phrase(), Some("Short And Stout"));
        let all: Vec<_> = head.headers.get_all("x-upstream").iter().collect();
        assert_eq!(all, ["a", "b"]);
        let mut wire = Vec::new();
        head.header_to_h1_wire(&mut wire);
        let wire = String::from_utf8(wire).unwrap();
        assert!(
            wire.contains("Content-Type: application/x-ndjson\r\n"),
            "{wire}"
        );
        assert!(wire.contains("x-request-id: r1\r\n"), "{wire}");
    }

    #[test]
    fn a_request_keeps_its_method_target_and_headers() {
        let mut head = RequestHeader::build("POST", b"/api/chat?x=1", None).unwrap();
        head.append_header("Content-Type", "application/json")
            .unwrap();
        edit_request(&mut head, |parts| {
            parts.headers.remove(http::header::CONTENT_TYPE);
            parts
                .headers
                .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(12));
        });
        assert_eq!(head.method, "POST");
        assert_eq!(head.raw_path(), b"/api/chat?x=1");
        assert!(head.headers.get("content-type").is_none());
        assert_eq!(head.headers["content-length"], "12");
    }
}
