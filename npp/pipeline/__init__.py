"""The data layer and the files that pass between the stages: the shard set (shards.py: schema, writer, meta and
manifest), the sample stream over it (stream.py, global_order.py, global_stream.py, tar_reader.py, mixing.py),
image sources and decoding (sources.py, images.py), the toy set (toy.py), the run folder (runs.py), the checks of
input files (inputs.py), the evaluation protocol (eval_spec.py), and the downloaded assets (assets.py: the
tokenizer, references and released checkpoints, checked by their kind)."""
