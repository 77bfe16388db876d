"""TensorFlow reading DeepMind's TFRecords, the yardstick of the converter's and the feed's speed.

    PYTHON bench/tf_reader.py SRC NAME WORKERS REPEATS [VIEWS BATCHES]

PYTHON is an interpreter with TensorFlow (kept out of this project's environment: a 500 MB
dependency). Reads SRC/NAME/train/*.tfrecord as a TensorFlow user would with WORKERS parallel
reads and calls: `tf.data.TFRecordDataset`, `tf.io.parse_single_example`, `tf.io.decode_jpeg`
with the accurate DCT (the converter's decode), and for 84 and 128 px frames the area resize to
64 px; every image reaches NumPy. Prints one JSON line: {"records", "seconds": [per repeat]},
after a warm-up pass. bench/data_bench.py runs it (`--tensorflow PYTHON`) beside the converter.

With VIEWS and BATCHES, what a training loop gets instead (the feed group): per record VIEWS
views drawn at random, only those decoded, batched by 36, BATCHES batches a repeat from a
shuffled, repeated dataset; "records" then counts the scenes of one repeat, and "cpu_seconds"
gives the CPU time of each repeat, all of TensorFlow's threads together.
"""

import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    src, name, workers, repeats = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    views, batches = (int(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 6 else (None, None)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(workers)
    tf.config.threading.set_intra_op_parallelism_threads(workers)
    files = sorted(str(p) for p in (src / name / "train").iterdir() if p.name.endswith(".tfrecord"))
    features = {"frames": tf.io.VarLenFeature(tf.string), "cameras": tf.io.VarLenFeature(tf.float32)}

    def decode(record):
        example = tf.io.parse_single_example(record, features)
        jpegs = tf.sparse.to_dense(example["frames"])
        if views is not None:  # the views a training batch asks for, and only those decoded
            jpegs = tf.gather(jpegs, tf.random.shuffle(tf.range(tf.shape(jpegs)[0]))[:views])
        images = tf.map_fn(
            lambda j: tf.io.decode_jpeg(j, channels=3, dct_method="INTEGER_ACCURATE"),
            jpegs,
            fn_output_signature=tf.uint8,
        )
        images = tf.cond(
            tf.shape(images)[1] == 64,
            lambda: images,
            lambda: tf.cast(tf.round(tf.image.resize(images, (64, 64), method="area")), tf.uint8),
        )
        cameras = tf.reshape(tf.sparse.to_dense(example["cameras"]), (-1, 5))
        return images, cameras

    options = tf.data.Options()  # tf.data's own thread pool has a thread per core unless told
    options.threading.private_threadpool_size = workers
    options.threading.max_intra_op_parallelism = 1
    dataset = tf.data.TFRecordDataset(files, num_parallel_reads=workers)
    if views is not None:
        dataset = dataset.repeat().shuffle(1000).map(decode, num_parallel_calls=workers).batch(36)
        feed = iter(dataset.prefetch(2).with_options(options).as_numpy_iterator())
        for _ in range(batches):  # warm-up: the file pages, the graph, the shuffle buffer
            next(feed)
        seconds, cpu_seconds = [], []
        for _ in range(repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(batches):
                next(feed)
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)  # every thread of TensorFlow's
        print(json.dumps({"records": 36 * batches, "seconds": seconds, "cpu_seconds": cpu_seconds}))
        return 0
    dataset = dataset.map(decode, num_parallel_calls=workers).prefetch(2).with_options(options)
    records = sum(1 for _ in dataset.as_numpy_iterator())  # warm-up: the file pages, the graph
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in dataset.as_numpy_iterator():
            pass
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"records": records, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
