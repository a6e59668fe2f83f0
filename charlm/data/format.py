"""The prepared-dir format: its file names and meta.json's identity, for every module that reads or writes one."""

SPLITS = ("train", "val", "test")
DATA_FORMAT = "charlm-data"
DATA_VERSION = 1
TOKENIZER_FILE = "tokenizer.model"  # the serialized SentencePiece model, in the prepared dir
PREPARED_FILES = ("meta.json", *(f"{s}.bin" for s in SPLITS), TOKENIZER_FILE)  # all a prepared dir holds
