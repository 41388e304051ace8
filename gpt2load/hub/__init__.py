"""Getting GPT-2's files: where they come from (sources, as data), ranged and resumable HTTP, the content
checks a file passes before it is recorded, and the manifest of a download folder."""
