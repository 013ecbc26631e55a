//! What the embedded store serves: s3s-fs for every operation, with object
//! bodies read in large pieces.
//!
//! s3s-fs streams an object 4 KiB at a time, each read a hop to a blocking
//! thread and each piece its own write to the socket, which wakes the
//! client for every 4 KiB: about 262,000 of each per GiB, so a download
//! from the embedded store cost both ends more CPU than its bytes did. Its
//! answer is kept whole (signature checks, ranges, headers, ETag and
//! checksums): only the body is read again, in pieces of [`PIECE`], from
//! the same file, and only while that file is still the one it answered
//! for (the same length and modification time). Otherwise, and for any key
//! that is not a plain relative path, its own body goes out.

use std::io::{Read, Seek};
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use s3s::dto::{
    AbortMultipartUploadInput, AbortMultipartUploadOutput, CompleteMultipartUploadInput,
    CompleteMultipartUploadOutput, CopyObjectInput, CopyObjectOutput, CreateBucketInput,
    CreateBucketOutput, CreateMultipartUploadInput, CreateMultipartUploadOutput, DeleteBucketInput,
    DeleteBucketOutput, DeleteObjectInput, DeleteObjectOutput, DeleteObjectsInput,
    DeleteObjectsOutput, GetBucketLocationInput, GetBucketLocationOutput, GetObjectInput,
    GetObjectOutput, HeadBucketInput, HeadBucketOutput, HeadObjectInput, HeadObjectOutput,
    ListBucketsInput, ListBucketsOutput, ListObjectsInput, ListObjectsOutput, ListObjectsV2Input,
    ListObjectsV2Output, ListPartsInput, ListPartsOutput, PutObjectInput, PutObjectOutput, Range,
    StreamingBlob, Timestamp, UploadPartCopyInput, UploadPartCopyOutput, UploadPartInput,
    UploadPartOutput,
};
use s3s::stream::{ByteStream, RemainingLength};
use s3s::{S3Request, S3Response, S3Result, S3};
use tokio::sync::mpsc;

/// How much of an object one read takes and one piece of the body holds.
const PIECE: usize = 256 * 1024;

/// Pieces read ahead of the socket.
const AHEAD: usize = 4;

/// s3s-fs over `root`, serving object bodies in large pieces.
pub(crate) struct Served {
    fs: s3s_fs::FileSystem,
    /// The directory s3s-fs keeps its buckets in (canonical).
    root: PathBuf,
}

impl Served {
    /// Serves `fs`, which keeps its buckets under `root`.
    pub(crate) fn new(fs: s3s_fs::FileSystem, root: PathBuf) -> Self {
        Served { fs, root }
    }

    /// The file s3s-fs keeps `key` of `bucket` in, when both are plain
    /// relative paths (s3s-fs resolves anything else itself, and its own
    /// body is served for it).
    fn file_of(&self, bucket: &str, key: &str) -> Option<PathBuf> {
        let plain = |p: &str| {
            !p.is_empty()
                && Path::new(p)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)))
        };
        (plain(bucket) && plain(key)).then(|| self.root.join(bucket).join(key))
    }
}

/// The body of an answer: the pieces [`read_pieces`] sends, `left` bytes
/// of them still to come.
struct FileBody {
    pieces: mpsc::Receiver<std::io::Result<Bytes>>,
    left: u64,
}

impl FileBody {
    /// The body for the answer s3s-fs gave: `length` bytes of the file at
    /// `path` for `range`, when the file is still the one it answered for
    /// (modified at `modified`); `None` otherwise.
    async fn open(
        path: PathBuf,
        range: Option<Range>,
        length: u64,
        modified: Timestamp,
    ) -> Option<FileBody> {
        let opened = tokio::task::spawn_blocking(move || {
            let mut file = std::fs::File::open(&path).ok()?;
            let meta = file.metadata().ok()?;
            if !meta.is_file() || Timestamp::from(meta.modified().ok()?) != modified {
                return None;
            }
            let span = match range {
                None => 0..meta.len(),
                Some(range) => range.check(meta.len()).ok()?,
            };
            if span.end - span.start != length {
                return None;
            }
            file.seek(std::io::SeekFrom::Start(span.start)).ok()?;
            Some(file)
        })
        .await
        .ok()??;
        let (tx, pieces) = mpsc::channel(AHEAD);
        tokio::spawn(read_pieces(opened, length, tx));
        Some(FileBody {
            pieces,
            left: length,
        })
    }
}

/// Sends `left` bytes of `file`, from where it stands, to `tx` a piece at
/// a time, each read on a blocking thread that is given back between
/// pieces: a client reading slowly holds no thread of the process's
/// blocking pool, which the rest of the server shares. Stops early when the
/// body is dropped (the client went away) or the file ends short.
async fn read_pieces(file: std::fs::File, mut left: u64, tx: mpsc::Sender<std::io::Result<Bytes>>) {
    let file = std::sync::Arc::new(file);
    while left > 0 {
        let want = usize::try_from(left.min(PIECE as u64)).unwrap_or(PIECE);
        let reader = std::sync::Arc::clone(&file);
        let Ok(read) = tokio::task::spawn_blocking(move || read_piece(&reader, want)).await else {
            return;
        };
        let piece = match read {
            Ok(piece) if piece.is_empty() => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the object became shorter while it was read",
            )),
            other => other,
        };
        let last = piece.is_err();
        if let Ok(piece) = &piece {
            left -= piece.len() as u64;
        }
        if tx.send(piece).await.is_err() || last {
            return;
        }
    }
}

/// Up to `want` bytes of `file` from where it stands; fewer only at its end.
fn read_piece(file: &std::fs::File, want: usize) -> std::io::Result<Bytes> {
    // `read_to_end` fills the capacity without zeroing it first and goes
    // on after a short or interrupted read.
    let mut piece = Vec::with_capacity(want);
    file.take(want as u64).read_to_end(&mut piece)?;
    Ok(Bytes::from(piece))
}

impl futures::Stream for FileBody {
    type Item = Result<Bytes, s3s::StdError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.pieces.poll_recv(cx) {
            Poll::Ready(Some(Ok(piece))) => {
                self.left = self.left.saturating_sub(piece.len() as u64);
                Poll::Ready(Some(Ok(piece)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl ByteStream for FileBody {
    fn remaining_length(&self) -> RemainingLength {
        RemainingLength::new_exact(usize::try_from(self.left).unwrap_or(usize::MAX))
    }
}

#[async_trait::async_trait]
impl S3 for Served {
    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let file = self.file_of(&req.input.bucket, &req.input.key);
        let range = req.input.range;
        let mut answer = self.fs.get_object(req).await?;
        let output = &answer.output;
        let known = (output.content_length, output.last_modified.clone());
        if let (Some(path), (Some(length), Some(modified))) = (file, known) {
            if let Ok(length) = u64::try_from(length) {
                if let Some(body) = FileBody::open(path, range, length, modified).await {
                    answer.output.body = Some(StreamingBlob::new(body));
                }
            }
        }
        Ok(answer)
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.fs.abort_multipart_upload(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        self.fs.complete_multipart_upload(req).await
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        self.fs.copy_object(req).await
    }

    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        self.fs.create_bucket(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.fs.create_multipart_upload(req).await
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        self.fs.delete_bucket(req).await
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.fs.delete_object(req).await
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        self.fs.delete_objects(req).await
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.fs.get_bucket_location(req).await
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.fs.head_bucket(req).await
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        self.fs.head_object(req).await
    }

    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        self.fs.list_buckets(req).await
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        self.fs.list_objects(req).await
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.fs.list_objects_v2(req).await
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        self.fs.list_parts(req).await
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        self.fs.put_object(req).await
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        self.fs.upload_part(req).await
    }

    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        self.fs.upload_part_copy(req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn object(dir: &Path, len: usize) -> (PathBuf, Vec<u8>, Timestamp) {
        let data: Vec<u8> = (0..len).map(|i| (i * 13 % 241) as u8).collect();
        let path = dir.join("object");
        std::fs::write(&path, &data).unwrap();
        let modified = Timestamp::from(std::fs::metadata(&path).unwrap().modified().unwrap());
        (path, data, modified)
    }

    async fn read(body: FileBody) -> Vec<u8> {
        let pieces: Vec<_> = body.collect().await;
        assert!(
            pieces
                .iter()
                .all(|p| p.as_ref().is_ok_and(|p| p.len() <= PIECE)),
            "a piece failed or was larger than {PIECE} bytes"
        );
        pieces.into_iter().flat_map(|p| p.unwrap()).collect()
    }

    #[tokio::test]
    async fn the_body_is_the_range_s3s_answered_for_read_in_large_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let (path, data, modified) = object(dir.path(), 3 * PIECE + 99);
        let n = data.len();
        for (range, want) in [
            (None, &data[..]),
            (
                Some(Range::Int {
                    first: 5,
                    last: Some(PIECE as u64 + 7),
                }),
                &data[5..=PIECE + 7],
            ),
            (
                Some(Range::Int {
                    first: 2 * PIECE as u64,
                    last: None,
                }),
                &data[2 * PIECE..],
            ),
            (Some(Range::Suffix { length: 1000 }), &data[n - 1000..]),
        ] {
            let body = FileBody::open(path.clone(), range, want.len() as u64, modified.clone())
                .await
                .unwrap_or_else(|| panic!("{range:?}: not served"));
            assert_eq!(
                body.remaining_length().exact(),
                Some(want.len()),
                "{range:?}"
            );
            assert!(read(body).await == want, "{range:?}: other bytes");
        }
    }

    #[tokio::test]
    async fn a_file_that_is_not_the_one_s3s_answered_for_is_left_to_s3s() {
        let dir = tempfile::tempdir().unwrap();
        let (path, data, modified) = object(dir.path(), 1000);
        let len = data.len() as u64;
        // Another length than the answer's.
        assert!(
            FileBody::open(path.clone(), None, len - 1, modified.clone())
                .await
                .is_none()
        );
        // Modified since.
        let earlier = Timestamp::from(std::time::SystemTime::UNIX_EPOCH);
        assert!(FileBody::open(path.clone(), None, len, earlier)
            .await
            .is_none());
        // Gone, or a directory.
        let gone = dir.path().join("gone");
        assert!(FileBody::open(gone, None, len, modified.clone())
            .await
            .is_none());
        let here = Timestamp::from(std::fs::metadata(dir.path()).unwrap().modified().unwrap());
        assert!(FileBody::open(dir.path().to_path_buf(), None, 0, here)
            .await
            .is_none());
        // The same file and answer: served.
        assert!(FileBody::open(path, None, len, modified).await.is_some());
    }

    #[test]
    fn only_plain_relative_keys_are_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let fs = s3s_fs::FileSystem::new(dir.path()).unwrap();
        let served = Served::new(fs, dir.path().to_path_buf());
        assert_eq!(
            served.file_of("unidesk", "p/a.bin"),
            Some(dir.path().join("unidesk/p/a.bin"))
        );
        for (bucket, key) in [
            ("unidesk", "../other/a.bin"),
            ("unidesk", "p/../../a.bin"),
            ("unidesk", "/etc/passwd"),
            ("unidesk", "./a"),
            ("unidesk", ""),
            ("..", "a"),
            ("", "a"),
        ] {
            assert_eq!(served.file_of(bucket, key), None, "{bucket:?} {key:?}");
        }
    }
}
