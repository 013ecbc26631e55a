//! Presigned URLs against the real embedded store (s3s over s3s-fs on a
//! local listener): what they allow and what the store refuses.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

use std::time::Duration;

use objects::embedded::{fresh_credentials, Embedded};
use objects::{ObjectStore, Presigned};
use sha2::{Digest, Sha256};

struct Running {
    store: ObjectStore,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn embedded(ttl: Duration) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let (access, secret) = fresh_credentials();
    let embedded = Embedded::new(dir.path(), "unidesk", &access, secret).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let store = ObjectStore::new(&embedded.client_config(&endpoint, ttl)).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    tokio::spawn(embedded.run(listener, async {
        let _ = stopped.await;
    }));
    store.check().await.unwrap();
    Running {
        store,
        _dir: dir,
        stop: Some(stop),
    }
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

async fn put(p: &Presigned, body: Vec<u8>) -> reqwest::Response {
    let mut req = reqwest::Client::new().put(&p.url).body(body);
    for (k, v) in &p.headers {
        req = req.header(k, v);
    }
    req.send().await.unwrap()
}

/// Stores `data` as `key` through a presigned PUT, as a client does, and
/// checks the store took it.
async fn stored(s: &Running, key: &str, data: &[u8]) {
    let url = s.store.presign_put(key, Some(&sha(data))).await.unwrap();
    let r = put(&url, data.to_vec()).await;
    assert!(r.status().is_success(), "{key}: {}", r.status());
}

#[tokio::test]
async fn an_upload_and_a_download_through_presigned_urls_keep_size_and_sha256() {
    let s = embedded(Duration::from_secs(60)).await;
    let data = b"weights".repeat(1000);
    let url = s
        .store
        .presign_put("p/a.bin", Some(&sha(&data)))
        .await
        .unwrap();
    let r = put(&url, data.clone()).await;
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let info = s.store.head("p/a.bin").await.unwrap().unwrap();
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(info.sha256.as_deref(), Some(sha(&data).as_str()));
    let get = s.store.presign_get("p/a.bin", Some("a.bin")).await.unwrap();
    let body = reqwest::get(&get).await.unwrap().bytes().await.unwrap();
    assert_eq!(body.as_ref(), data.as_slice());
    assert_eq!(s.store.head("p/missing").await.unwrap(), None);
}

#[tokio::test]
async fn a_body_that_does_not_match_its_sha256_is_refused_by_the_store() {
    let s = embedded(Duration::from_secs(60)).await;
    let url = s
        .store
        .presign_put("p/b.bin", Some(&sha(b"good")))
        .await
        .unwrap();
    let r = put(&url, b"evil".to_vec()).await;
    // s3s answers 500 (its body check fails inside the write), S3 400.
    assert!(!r.status().is_success(), "{}", r.text().await.unwrap());
    assert_eq!(s.store.head("p/b.bin").await.unwrap(), None);
}

#[tokio::test]
async fn an_expired_or_tampered_url_is_refused_by_the_store() {
    let s = embedded(Duration::from_secs(1)).await;
    let data = b"x".to_vec();
    let url = s
        .store
        .presign_put("p/c.bin", Some(&sha(&data)))
        .await
        .unwrap();
    assert!(put(&url, data.clone()).await.status().is_success());

    let get = s.store.presign_get("p/c.bin", None).await.unwrap();
    let tampered = {
        let i = get.rfind("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
        let mut t = get.clone().into_bytes();
        t[i] = if t[i] == b'0' { b'1' } else { b'0' };
        String::from_utf8(t).unwrap()
    };
    assert_eq!(reqwest::get(&tampered).await.unwrap().status(), 403);

    // The expiry itself is under test: the URL's lifetime must pass on the
    // object store's clock, and nothing but waiting makes it pass.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = reqwest::get(&get).await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("expired"));
}

#[tokio::test]
async fn a_url_for_one_object_cannot_read_or_write_another() {
    let s = embedded(Duration::from_secs(60)).await;
    for (key, body) in [("p/a", b"aaa"), ("p/b", b"bbb")] {
        let url = s.store.presign_put(key, Some(&sha(body))).await.unwrap();
        assert!(put(&url, body.to_vec()).await.status().is_success());
    }
    let get_a = s.store.presign_get("p/a", None).await.unwrap();
    let r = reqwest::get(get_a.replace("/p/a?", "/p/b?")).await.unwrap();
    assert_eq!(r.status(), 403);
    let mut put_a = s
        .store
        .presign_put("p/a", Some(&sha(b"new")))
        .await
        .unwrap();
    put_a.url = put_a.url.replace("/p/a?", "/p/b?");
    assert_eq!(put(&put_a, b"new".to_vec()).await.status(), 403);
    let get_b = s.store.presign_get("p/b", None).await.unwrap();
    let body = reqwest::get(&get_b).await.unwrap().bytes().await.unwrap();
    assert_eq!(body.as_ref(), b"bbb");
}

#[tokio::test]
async fn a_multipart_upload_checks_each_part_and_assembles_them_in_order() {
    let s = embedded(Duration::from_secs(60)).await;
    let part = objects::MIN_PART_BYTES as usize;
    let data: Vec<u8> = (0..part * 2 + 1000).map(|i| (i % 251) as u8).collect();
    let whole = sha(&data);
    let upload = s
        .store
        .start_multipart("p/big", Some(&whole))
        .await
        .unwrap();
    let mut etags = Vec::new();
    for (i, chunk) in data.chunks(part).enumerate() {
        let n = i as u32 + 1;
        let bad = s
            .store
            .presign_part("p/big", &upload, n, Some(&sha(chunk)))
            .await
            .unwrap();
        let mut corrupted = chunk.to_vec();
        corrupted[0] ^= 1;
        assert!(
            !put(&bad, corrupted).await.status().is_success(),
            "part {n}"
        );
        let url = s
            .store
            .presign_part("p/big", &upload, n, Some(&sha(chunk)))
            .await
            .unwrap();
        let r = put(&url, chunk.to_vec()).await;
        assert!(r.status().is_success(), "part {n}");
        let etag = r.headers()["etag"].to_str().unwrap().to_string();
        etags.push((n, etag));
    }
    s.store
        .complete_multipart("p/big", &upload, &etags)
        .await
        .unwrap();
    let info = s.store.head("p/big").await.unwrap().unwrap();
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(info.sha256.as_deref(), Some(whole.as_str()));
    let get = s.store.presign_get("p/big", None).await.unwrap();
    let body = reqwest::get(&get).await.unwrap().bytes().await.unwrap();
    assert_eq!(sha(&body), whole);
}

#[tokio::test]
async fn an_object_read_back_gives_its_size_sha256_and_blake3_and_stops_past_the_bytes_expected() {
    use objects::ReadBack;
    let s = embedded(Duration::from_secs(60)).await;
    // Larger than one network read, so the hash runs over many chunks.
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i| (i % 199) as u8).collect();
    let url = s
        .store
        .presign_put("p/r.bin", Some(&sha(&data)))
        .await
        .unwrap();
    assert!(put(&url, data.clone()).await.status().is_success());
    let whole = ReadBack::Whole {
        size: data.len() as u64,
        sha256: sha(&data),
        blake3: blake3::hash(&data).to_hex().to_string(),
    };
    let n = data.len() as u64;
    assert_eq!(s.store.read_back("p/r.bin", n).await.unwrap(), Some(whole));
    assert_eq!(
        s.store.read_back("p/r.bin", n - 1).await.unwrap(),
        Some(ReadBack::Longer { than: n - 1 })
    );
    assert_eq!(s.store.read_back("p/none", n).await.unwrap(), None);
}

#[tokio::test]
async fn a_refused_multipart_completion_is_an_error_and_an_aborted_upload_takes_no_part() {
    let s = embedded(Duration::from_secs(60)).await;
    let id = s.store.start_multipart("p/m.bin", None).await.unwrap();
    let part = s.store.presign_part("p/m.bin", &id, 1, None).await.unwrap();
    let small = put(&part, vec![1; 10]).await;
    let etag = small.headers()["etag"].to_str().unwrap().to_string();
    let part2 = s.store.presign_part("p/m.bin", &id, 2, None).await.unwrap();
    assert!(put(&part2, vec![2; 10]).await.status().is_success());
    // Part 1 is under 5 MiB and not the last: the store refuses, and so
    // must the call.
    let refused = s
        .store
        .complete_multipart("p/m.bin", &id, &[(1, etag.clone()), (2, etag)])
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("EntityTooSmall"), "{refused}");
    assert_eq!(s.store.head("p/m.bin").await.unwrap(), None);

    let id = s.store.start_multipart("p/n.bin", None).await.unwrap();
    s.store.abort_multipart("p/n.bin", &id).await.unwrap();
    let part = s.store.presign_part("p/n.bin", &id, 1, None).await.unwrap();
    assert!(!put(&part, vec![1; 10]).await.status().is_success());
}

#[tokio::test]
async fn an_object_is_served_whole_and_by_ranges_across_its_pieces() {
    let s = embedded(Duration::from_secs(60)).await;
    // Several of the store's read pieces (256 KiB) and a bit.
    let data: Vec<u8> = (0..1024 * 1024 + 1001)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    stored(&s, "p/pieces.bin", &data).await;
    let get = s.store.presign_get("p/pieces.bin", None).await.unwrap();
    let client = reqwest::Client::new();
    let whole = client.get(&get).send().await.unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.content_length(), Some(data.len() as u64));
    assert!(whole.headers().contains_key("etag"));
    assert_eq!(sha(&whole.bytes().await.unwrap()), sha(&data));
    let n = data.len();
    for (range, want) in [
        ("bytes=300000-", &data[300_000..]),
        ("bytes=5-262200", &data[5..=262_200]),
        ("bytes=262144-524288", &data[262_144..=524_288]),
        ("bytes=-777", &data[n - 777..]),
        ("bytes=0-0", &data[..1]),
        ("bytes=1000-99999999", &data[1000..]),
    ] {
        let part = client
            .get(&get)
            .header("range", range)
            .send()
            .await
            .unwrap();
        assert_eq!(part.status(), 206, "{range}");
        let total = format!("/{n}");
        let content_range = part.headers()["content-range"].to_str().unwrap().to_owned();
        assert!(content_range.ends_with(&total), "{range}: {content_range}");
        let body = part.bytes().await.unwrap();
        assert_eq!(body.len(), want.len(), "{range}");
        assert!(body.as_ref() == want, "{range}: other bytes");
    }
    let past = client
        .get(&get)
        .header("range", format!("bytes={n}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(past.status(), 416);
    // Replaced by another upload: the next read serves the new bytes.
    let other = b"smaller now".to_vec();
    stored(&s, "p/pieces.bin", &other).await;
    let body = client
        .get(&get)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.as_ref(), other.as_slice());
}

/// Clients that stop reading hold no thread of the blocking pool, which
/// the store shares with the rest of the server (s3s-fs's file operations
/// among others): with a pool of two threads and three downloads stalled,
/// another download and an upload still go through.
#[test]
fn downloads_a_client_stopped_reading_do_not_hold_the_blocking_threads() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let outcome = runtime.block_on(async {
        let s = embedded(Duration::from_secs(60)).await;
        // Far more than the sockets' buffers hold.
        let data: Vec<u8> = (0..64 * 1024 * 1024).map(|i| (i % 253) as u8).collect();
        stored(&s, "p/stalled.bin", &data).await;
        let get = s.store.presign_get("p/stalled.bin", None).await.unwrap();
        let answered = tokio::time::timeout(Duration::from_secs(60), async {
            let mut stalled = Vec::new();
            for _ in 0..3 {
                // A fresh client each: its own connection, never read.
                let response = reqwest::Client::new().get(&get).send().await.unwrap();
                assert_eq!(response.status(), 200);
                stalled.push(response);
            }
            // Time for the store to fill the stalled connections.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let body = reqwest::get(&get).await.unwrap().bytes().await.unwrap();
            assert_eq!(sha(&body), sha(&data));
            let small = b"still taken".to_vec();
            stored(&s, "p/after.bin", &small).await;
            drop(stalled);
        })
        .await;
        answered.map_err(|_| "the store stopped answering while downloads were stalled")
    });
    // Threads stuck in the pool would make dropping the runtime wait for
    // ever: it is given a second.
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome.unwrap();
}
