//! The Backend.AI workers' operations (`/api`, `/v1`): ids, summaries,
//! success answers and the errors their handlers raise.
