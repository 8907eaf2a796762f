"""Refuse an oversized multipart body from its Content-Length, before Django spools it to disk."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.files.uploadhandler import FileUploadHandler

#: Room for the form fields and multipart boundaries around the file itself.
FORM_OVERHEAD_BYTES = 64 * 1024


class UploadSizeLimitHandler(FileUploadHandler):
    """First upload handler: checks the declared body size; the others store the file."""

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        limit = settings.NASWEB_MAX_UPLOAD_BYTES
        if content_length and content_length > limit + FORM_OVERHEAD_BYTES:
            raise RequestDataTooBig(f"the upload is {content_length:,} bytes; the limit is {limit:,} bytes")

    def receive_data_chunk(self, raw_data, start):
        return raw_data  # pass every chunk on to the next handler

    def file_complete(self, file_size):
        return None
