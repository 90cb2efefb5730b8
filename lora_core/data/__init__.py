"""Dataset pipeline: folder scan, captions, image loading, resizing, buckets, saved datasets.

Images are [H, W, 3] float32 tensors in 0..1 (ComfyUI IMAGE without the batch dimension);
latents are per-sample [C, H, W] tensors; a conditioning is ComfyUI's list of [tensor, dict].
"""

from .buckets import (BucketSpec, LatentBucket, bucket_table, fit_to_bucket, flatten_latent_batches,
                      group_latents_by_size, make_buckets, nearest_bucket)
from .builtin_format import load_builtin_dataset
from .captions import CaptionOptions, caption_entries, read_caption_file, with_trigger
from .folder_dataset import FolderDataset, FolderOptions, load_image_folder
from .images import ImageLoadOptions, ImageTooLarge, LoadedImages, load_image, load_images
from .load_any import list_dataset_folders, load_training_dataset
from .pairs import PairDataset, PairOptions, PairScan, load_pair_folder, scan_pairs
from .paths import resolve_inside
from .resize import ResizeSpec, cover_crop, fit_pad, resize_image
from .dataset_reader import DatasetReader, load_dataset, open_dataset, read_manifest
from .saved_dataset import DatasetSamples, SampleInfo, SaveOptions, file_sha256, is_saved_dataset, save_dataset
from .scan import IMAGE_EXTENSIONS, FolderScan, ImageEntry, scan_folder

__all__ = [
    "BucketSpec", "LatentBucket", "bucket_table", "fit_to_bucket", "flatten_latent_batches",
    "group_latents_by_size", "make_buckets", "nearest_bucket", "load_builtin_dataset", "CaptionOptions",
    "caption_entries", "read_caption_file", "with_trigger", "FolderDataset", "FolderOptions", "load_image_folder",
    "ImageLoadOptions", "ImageTooLarge", "LoadedImages", "load_image", "load_images", "list_dataset_folders",
    "load_training_dataset", "PairDataset", "PairOptions", "PairScan", "load_pair_folder", "scan_pairs",
    "resolve_inside", "ResizeSpec", "cover_crop", "fit_pad", "resize_image",
    "DatasetReader", "read_manifest", "DatasetSamples", "SampleInfo", "SaveOptions", "file_sha256", "is_saved_dataset",
    "load_dataset", "open_dataset", "save_dataset", "IMAGE_EXTENSIONS", "FolderScan", "ImageEntry", "scan_folder",
]
