//! [`JobClient::map`]: Python's `Executor.map` across the network, over one
//! `Map` stream.
//!
//! Arguments go up the stream in chunks as the transport takes them (so a
//! long or endless iterator is never read ahead of HTTP/2 flow control),
//! and the server runs at most `max_in_flight` of them at once. Each
//! argument gets its own answer, success or failure, so one failed job
//! does not end the map.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use futures::{Stream, StreamExt as _};
use jobd_proto::{pb, value};

use crate::{answer::MapItem, client::JobClient, error::Error, request::MapOptions, wire};

/// Arguments sent per request message at most: big enough to amortise
/// framing, small enough that a slow argument source is not held back.
const ARGS_PER_MESSAGE: usize = 64;

/// Encoded argument bytes per request message at most, well under the
/// server's default 4 MiB message limit: large arguments go in messages of
/// their own instead of sinking the whole map with `OUT_OF_RANGE`.
const BYTES_PER_MESSAGE: usize = 1024 * 1024;

/// The results of a map, a [`Stream`] of one [`MapItem`] per argument. An
/// `Err` item means the stream itself failed (transport, server shutdown)
/// and is the last one. Dropping it before the end cancels the map's
/// unfinished jobs on the server.
#[derive(Debug)]
pub struct MapResults {
    responses: tonic::Streaming<pb::MapResponse>,
    /// Ends the request stream. The transport resets the call only once
    /// both directions are let go of, so dropping the responses alone would
    /// leave a map whose arguments are still coming (or never end) running.
    requests: futures::stream::AbortHandle,
}

impl Drop for MapResults {
    fn drop(&mut self) {
        self.requests.abort();
    }
}

impl Stream for MapResults {
    type Item = Result<MapItem, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.responses
            .poll_next_unpin(cx)
            .map(|next| next.map(|response| wire::map_item(response?)))
    }
}

impl JobClient {
    /// Runs `function` on every argument, like Python's `Executor.map`:
    /// results come back in argument order, with at most the server's
    /// default number (64) of jobs in flight. Each job is a real job
    /// (visible to `status` and `list_jobs`). Arguments are taken from the
    /// iterator only as the server accepts them.
    ///
    /// ```no_run
    /// # async fn run(client: jobd_client::JobClient) -> Result<(), jobd_client::Error> {
    /// use futures::TryStreamExt as _;
    /// use serde_json::json;
    ///
    /// let names = ["Ann", "Bob", "Cy"].map(|name| json!(name));
    /// let mut results = client.map("hello", names).await?;
    /// while let Some(item) = results.try_next().await? {
    ///     match item.result {
    ///         Ok(greeting) => println!("{}: {greeting}", item.index),
    ///         Err(failure) => println!("{}: failed: {failure}", item.index),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] for an unknown function,
    /// [`Error::InvalidArgument`], transport errors.
    pub async fn map<I>(&self, function: &str, args: I) -> Result<MapResults, Error>
    where
        I: IntoIterator<Item = serde_json::Value>,
        I::IntoIter: Send + 'static,
    {
        self.map_with(MapOptions::new(function), futures::stream::iter(args))
            .await
    }

    /// Maps with every option, over any stream of arguments (read only as
    /// fast as the server accepts them, so it may be endless).
    ///
    /// ```no_run
    /// # async fn run(client: jobd_client::JobClient) -> Result<(), jobd_client::Error> {
    /// use futures::{StreamExt as _, TryStreamExt as _};
    /// use jobd_client::MapOptions;
    ///
    /// let args = futures::stream::iter(0..1000).map(serde_json::Value::from);
    /// let options = MapOptions::new("noop").unordered().max_in_flight(128);
    /// let done: Vec<_> = client.map_with(options, args).await?.try_collect().await?;
    /// assert_eq!(done.len(), 1000);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`JobClient::map`].
    pub async fn map_with<S>(&self, options: MapOptions, args: S) -> Result<MapResults, Error>
    where
        S: Stream<Item = serde_json::Value> + Send + 'static,
    {
        let start = pb::MapRequest {
            start: Some(wire::map_start(options)),
            args: Vec::new(),
        };
        let requests = futures::stream::once(std::future::ready(start)).chain(
            args.ready_chunks(ARGS_PER_MESSAGE)
                .flat_map(|chunk| futures::stream::iter(messages(chunk))),
        );
        let (requests, abort) = futures::stream::abortable(requests);
        let responses = match self.rpc().map(requests).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                abort.abort();
                return Err(status.into());
            }
        };
        Ok(MapResults {
            responses,
            requests: abort,
        })
    }
}

/// Arguments that were ready together, as request messages of at most
/// [`BYTES_PER_MESSAGE`] each (or one argument, if it alone is larger).
fn messages(chunk: Vec<serde_json::Value>) -> Vec<pb::MapRequest> {
    use prost::Message as _;
    let mut messages = Vec::new();
    let (mut args, mut bytes) = (Vec::new(), 0);
    for arg in chunk {
        let arg = value::from_json(arg);
        let len = arg.encoded_len();
        if !args.is_empty() && bytes + len > BYTES_PER_MESSAGE {
            messages.push(pb::MapRequest {
                start: None,
                args: std::mem::take(&mut args),
            });
            bytes = 0;
        }
        bytes += len;
        args.push(arg);
    }
    if !args.is_empty() {
        messages.push(pb::MapRequest { start: None, args });
    }
    messages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_arguments_are_split_across_messages() {
        let small: Vec<_> = (0..10).map(serde_json::Value::from).collect();
        let one = messages(small);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].args.len(), 10);

        let big = serde_json::Value::String("x".repeat(BYTES_PER_MESSAGE / 2));
        let split = messages(vec![big.clone(), big.clone(), big, 1.into()]);
        let sizes: Vec<usize> = split.iter().map(|m| m.args.len()).collect();
        // Two halves never share a message with a third; nothing is lost.
        assert_eq!(sizes, [1, 1, 2]);
        assert!(split.iter().all(|m| m.start.is_none()));
        assert!(messages(Vec::new()).is_empty());
    }
}
