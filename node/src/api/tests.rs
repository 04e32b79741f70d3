use super::*;

#[test]
fn openapi_is_json_and_lists_every_route() {
    let v: serde_json::Value =
        serde_json::from_str(openapi_json()).expect("the description parses");
    let paths = v["paths"].as_object().expect("paths");
    for p in [
        "/v1/volumes",
        "/v1/volumes/{name}",
        "/v1/volumes/{name}/attach",
        "/v1/volumes/{name}/detach",
        "/v1/volumes/{name}/mount",
        "/v1/volumes/{name}/unmount",
        "/v1/volumes/{name}/verify",
        "/v1/pool",
        "/v1/node",
        "/v1/nodes",
        "/v1/cluster",
        "/v1/openapi.json",
        "/metrics",
    ] {
        assert!(paths.contains_key(p), "openapi.json lacks {p}");
    }
    // Every method the router serves is described, with its errors.
    for (p, m) in [
        ("/v1/volumes", "get"),
        ("/v1/volumes", "post"),
        ("/v1/volumes/{name}", "get"),
        ("/v1/volumes/{name}", "patch"),
        ("/v1/volumes/{name}", "delete"),
        ("/v1/nodes/{name}", "delete"),
    ] {
        assert!(v["paths"][p][m].is_object(), "{m} {p} not described");
    }
    assert!(v["paths"]["/v1/volumes"]["post"]["responses"]["507"].is_object());
    // Request bodies are strict in the description too.
    assert_eq!(
        v["components"]["schemas"]["VolumeCreate"]["additionalProperties"],
        false
    );
}

#[test]
fn the_described_size_limits_are_the_daemons() {
    assert_eq!(api::MAX_SIZE_BYTES, crate::types::MAX_VOLUME_SIZE);
    assert_eq!(api::SIZE_ALIGN_BYTES, crate::types::SIZE_ALIGN);
    let v: serde_json::Value = serde_json::from_str(openapi_json()).expect("parses");
    let size = &v["components"]["schemas"]["SizeArg"]["oneOf"];
    assert_eq!(size[0]["multipleOf"], 4096, "{size}");
    assert_eq!(size[1]["pattern"], api::SIZE_TEXT_PATTERN, "{size}");
}

#[test]
fn bodies_are_strict() {
    assert!(parse_body::<VolumeCreate>(&Bytes::from_static(
        br#"{"name":"a","size":"1G","color":"red"}"#
    ))
    .is_err());
    assert!(parse_body::<VolumeCreate>(&Bytes::from_static(br#"{"name":"a""#)).is_err());
    assert!(parse_body::<VolumeCreate>(&Bytes::new()).is_err());
    let ok: VolumeCreate =
        parse_body(&Bytes::from_static(br#"{"name":"a","size":4096}"#)).expect("valid");
    assert_eq!(ok.size, Some(api::SizeArg::Bytes(4096)));
    assert!(empty_body(&Bytes::from_static(b"{}")).is_ok());
    assert!(empty_body(&Bytes::from_static(br#"{"force":true}"#)).is_err());
}
