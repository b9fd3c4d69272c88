"""Files in and out of fal: input files as data URIs, fal file objects in results, downloads and storage."""
