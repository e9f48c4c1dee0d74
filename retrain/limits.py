"""Limits on what one input may cost, each defined once and imported where it is checked."""

# Pixels one image may announce in its header before it is refused unopened: PIL's own
# decompression-bomb limit (~89 MP). split's default (data.max_image_pixels), `retrain predict`,
# the served MLflow model and the SavedModel's serving graph.
MAX_IMAGE_PIXELS = 89_478_485

# Bytes of one image file that `retrain predict` or the served model reads whole.
MAX_FILE_BYTES = 50 * 1024 * 1024

# Caps on one dataset, checked while downloading, extracting or copying (download.Limits); the
# defaults of params.yaml's data.max_* keys. They admit the official flower archive (229 MB, 3,670
# photos, ratio 1.0) and Oxford 102 (330 MB, 8,189 photos) with room to spare, and stop a zip or
# gzip of zeros (ratio ~1000).
MAX_DOWNLOAD_BYTES = 2_000_000_000  # bytes one download may fetch
MAX_EXTRACTED_BYTES = 5_000_000_000  # bytes extracted or copied into data/raw
MAX_ARCHIVE_ENTRIES = 100_000  # files, folders and links in the dataset
MAX_COMPRESSION_RATIO = 100.0  # extracted bytes / archive bytes

# Bytes of a file the pipeline reads whole that is not an image (retrain.small_files.read_capped):
# a labels CSV (100k images: ~5 MB), a label map, Oxford's .mat files (0.5 kB; also their variables
# once unpacked), provenance JSON. params.yaml has its own, smaller cap (retrain.params).
MAX_SMALL_FILE_BYTES = 64 * 1024 * 1024
