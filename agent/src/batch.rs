//! Group commit's one collector: the writer's (readings) and every receiver's (shipped
//! batches) gather what is queued into one batch per fsync the same way.

use std::time::{Duration, Instant};

/// Where a batch's items come from: `next(None)` takes one if there is one now,
/// `next(Some(d))` waits up to `d` for one.
pub trait Source<T> {
    fn next(&mut self, wait: Option<Duration>) -> Option<T>;
}

impl<T> Source<T> for flume::Receiver<T> {
    fn next(&mut self, wait: Option<Duration>) -> Option<T> {
        match wait {
            None => self.try_recv().ok(),
            Some(d) => self.recv_timeout(d).ok(),
        }
    }
}

/// A batch: `first`, everything already queued, then more until `max` items or `delay`
/// after the first.
pub fn collect<T>(first: T, max: usize, delay: Duration, source: &mut impl Source<T>) -> Vec<T> {
    let deadline = Instant::now() + delay;
    let mut batch = Vec::with_capacity(max.min(4096));
    batch.push(first);
    while batch.len() < max {
        if let Some(item) = source.next(None) {
            batch.push(item);
            continue;
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match source.next(Some(deadline - now)) {
            Some(item) => batch.push(item),
            None => break,
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Items queued now, then nothing.
    struct Queued(Vec<u32>);

    impl Source<u32> for Queued {
        fn next(&mut self, _wait: Option<Duration>) -> Option<u32> {
            if self.0.is_empty() {
                None
            } else {
                Some(self.0.remove(0))
            }
        }
    }

    #[test]
    fn a_batch_takes_what_is_queued_up_to_its_size() {
        let mut q = Queued((2..10).collect());
        assert_eq!(collect(1, 4, Duration::ZERO, &mut q), vec![1, 2, 3, 4]);
        assert_eq!(
            collect(0, 100, Duration::ZERO, &mut q),
            vec![0, 5, 6, 7, 8, 9]
        );
        assert_eq!(collect(7, 100, Duration::ZERO, &mut q), vec![7]);
    }
}
