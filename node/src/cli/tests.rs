use super::*;
use std::io::{Read, Write};

/// A one-shot HTTP server on loopback answering `status` with `body`.
fn answer_once(status: &str, body: &'static str) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let status = status.to_string();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}")
}

#[test]
fn an_answer_that_does_not_match_its_type_is_an_error() {
    let c = Client::new(&answer_once("200 OK", r#"{"id": 7}"#)).expect("client");
    let e = call::<api::VolumeInfo>(&c, "GET", "/v1/volumes/x", NONE).expect_err("typed");
    assert!(e.contains("does not understand"), "{e}");
}

#[test]
fn an_error_answer_shows_its_message_and_code() {
    let c = Client::new(&answer_once(
        "404 Not Found",
        r#"{"error": {"code": "VolumeNotFound", "message": "volume x not found"}}"#,
    ))
    .expect("client");
    let e = call::<api::VolumeInfo>(&c, "GET", "/v1/volumes/x", NONE).expect_err("404");
    assert_eq!(e, "volume x not found (VolumeNotFound, HTTP 404)");
}

#[test]
fn an_empty_answer_reads_as_none() {
    let c = Client::new(&answer_once("204 No Content", "")).expect("client");
    let v = call::<Option<api::VolumeDeleted>>(&c, "DELETE", "/v1/volumes/x", NONE)
        .expect("empty is fine");
    assert!(v.is_none());
}
