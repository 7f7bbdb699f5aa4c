"""Training data, one module per job, all of it core code (no models, converters or CLI):

- `indexed`: Megatron's indexed dataset on disk (`<prefix>.bin/.idx`), writer and reader;
- `indices`: the document / sample / shuffle / blending indices, as megatron-core builds them;
- `cache`: those indices saved next to the data, named by what determines them;
- `gpt`: GPT, blended and mock datasets, the data config and the train/valid/test builder;
- `samplers`: which global samples a data-parallel rank trains on;
- `tokenizer`: tokenizers from a local folder and the vocabulary checks;
- `prepare`: `mzoo data prepare`, JSONL / parquet tokenized into an indexed dataset;
- `sft`: finetuning data (formats, packing, the sampler);
- `errors`: `DataError`, what all of them raise for bad input.
"""
