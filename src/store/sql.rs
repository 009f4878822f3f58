//! One statement, either backend: the SQL text is shared (`$N` placeholders
//! work in SQLite too) and a statement's arguments are plain values
//! ([`Arg`]) that each driver encodes as its own types.
//!
//! Why not `sqlx::Any`: it has no UUID, timestamp or JSON types. Why not code
//! generic over `sqlx::Database`: every function would repeat an encode bound
//! per bound type. So a connection is an enum of the two drivers', and each
//! call picks its driver once, here; everything above is written once.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::types::Json;
use sqlx::{Arguments, Database, Encode, FromRow, SqlSafeStr, Transaction, Type};
use uuid::Uuid;

/// A statement argument.
#[derive(Clone, Debug)]
pub enum Arg {
    Uuid(Option<Uuid>),
    Int(Option<i64>),
    Int32(Option<i32>),
    Text(Option<String>),
    Time(Option<DateTime<Utc>>),
    Json(Option<Box<RawValue>>),
    Bytes(Vec<u8>),
    /// A column of values bound as one PostgreSQL array (for `unnest`, so
    /// a statement's text does not grow with its rows); SQLite refuses it.
    Column(Column),
}

/// The values of one column, for [`Arg::Column`].
#[derive(Clone, Debug)]
pub enum Column {
    Uuid(Vec<Option<Uuid>>),
    Int(Vec<Option<i64>>),
    Int32(Vec<Option<i32>>),
    Text(Vec<Option<String>>),
    Time(Vec<Option<DateTime<Utc>>>),
    Json(Vec<Option<Box<RawValue>>>),
}

impl Arg {
    /// A value stored as JSON (`jsonb` on PostgreSQL, text on SQLite).
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Arg {
        Arg::Json(Some(
            serde_json::value::to_raw_value(value).expect("domain types serialize"),
        ))
    }

    pub const NULL_JSON: Arg = Arg::Json(None);
}

impl From<Uuid> for Arg {
    fn from(v: Uuid) -> Arg {
        Arg::Uuid(Some(v))
    }
}
impl From<Option<Uuid>> for Arg {
    fn from(v: Option<Uuid>) -> Arg {
        Arg::Uuid(v)
    }
}
impl From<i64> for Arg {
    fn from(v: i64) -> Arg {
        Arg::Int(Some(v))
    }
}
impl From<Option<u16>> for Arg {
    /// Ports are `integer` columns.
    fn from(v: Option<u16>) -> Arg {
        Arg::Int32(v.map(i32::from))
    }
}
impl From<u16> for Arg {
    fn from(v: u16) -> Arg {
        Arg::Int32(Some(i32::from(v)))
    }
}
impl From<&str> for Arg {
    fn from(v: &str) -> Arg {
        Arg::Text(Some(v.to_owned()))
    }
}
impl From<Option<&str>> for Arg {
    fn from(v: Option<&str>) -> Arg {
        Arg::Text(v.map(str::to_owned))
    }
}
impl From<DateTime<Utc>> for Arg {
    fn from(v: DateTime<Utc>) -> Arg {
        Arg::Time(Some(v))
    }
}
impl From<Option<DateTime<Utc>>> for Arg {
    fn from(v: Option<DateTime<Utc>>) -> Arg {
        Arg::Time(v)
    }
}
impl From<&[u8]> for Arg {
    fn from(v: &[u8]) -> Arg {
        Arg::Bytes(v.to_vec())
    }
}

/// How a driver binds an [`Arg::Column`].
trait Columns: Database {
    fn add_column(
        out: &mut Self::Arguments,
        column: &Column,
    ) -> Result<(), sqlx::error::BoxDynError>;
}

impl Columns for sqlx::Postgres {
    fn add_column(
        out: &mut Self::Arguments,
        column: &Column,
    ) -> Result<(), sqlx::error::BoxDynError> {
        match column {
            Column::Uuid(v) => out.add(v),
            Column::Int(v) => out.add(v),
            Column::Int32(v) => out.add(v),
            Column::Text(v) => out.add(v),
            Column::Time(v) => out.add(v),
            Column::Json(v) => {
                out.add(v.iter().map(|j| j.as_deref().map(Json)).collect::<Vec<_>>())
            }
        }
    }
}

impl Columns for sqlx::Sqlite {
    fn add_column(_: &mut Self::Arguments, _: &Column) -> Result<(), sqlx::error::BoxDynError> {
        Err("array arguments are PostgreSQL's only".into())
    }
}

/// The driver's arguments for `args`.
fn arguments<DB: Columns>(args: &[Arg]) -> Result<DB::Arguments, sqlx::Error>
where
    for<'q> Option<Uuid>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<i32>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<DateTime<Utc>>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<Json<&'q RawValue>>: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
{
    let mut out = DB::Arguments::default();
    for arg in args {
        match arg {
            Arg::Uuid(v) => out.add(*v),
            Arg::Int(v) => out.add(*v),
            Arg::Int32(v) => out.add(*v),
            Arg::Text(v) => out.add(v.as_deref()),
            Arg::Time(v) => out.add(*v),
            Arg::Json(v) => out.add(v.as_deref().map(Json)),
            Arg::Bytes(v) => out.add(v.as_slice()),
            Arg::Column(c) => DB::add_column(&mut out, c),
        }
        .map_err(sqlx::Error::Encode)?;
    }
    Ok(out)
}

/// A row type both drivers can decode.
pub trait Decode:
    for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin
{
}
impl<T> Decode for T where
    T: for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin
{
}

/// A connection of either backend, borrowed for some statements.
pub enum Conn<'c> {
    Postgres(&'c mut PgConnection),
    Sqlite(&'c mut SqliteConnection),
}

impl Conn<'_> {
    /// Runs a statement; answers the rows it affected.
    pub async fn execute(&mut self, sql: impl SqlSafeStr, args: &[Arg]) -> sqlx::Result<u64> {
        Ok(match self {
            Conn::Postgres(c) => sqlx::query_with(sql, arguments::<sqlx::Postgres>(args)?)
                .execute(&mut **c)
                .await?
                .rows_affected(),
            Conn::Sqlite(c) => sqlx::query_with(sql, arguments::<sqlx::Sqlite>(args)?)
                .execute(&mut **c)
                .await?
                .rows_affected(),
        })
    }

    pub async fn fetch_all<T: Decode>(
        &mut self,
        sql: impl SqlSafeStr,
        args: &[Arg],
    ) -> sqlx::Result<Vec<T>> {
        match self {
            Conn::Postgres(c) => {
                sqlx::query_as_with(sql, arguments::<sqlx::Postgres>(args)?)
                    .fetch_all(&mut **c)
                    .await
            }
            Conn::Sqlite(c) => {
                sqlx::query_as_with(sql, arguments::<sqlx::Sqlite>(args)?)
                    .fetch_all(&mut **c)
                    .await
            }
        }
    }

    /// The rows of a query as they arrive, for reads too large to hold at once.
    pub fn fetch<'e, T: Decode + 'e>(
        &'e mut self,
        sql: &'static str,
        args: &[Arg],
    ) -> futures::stream::BoxStream<'e, sqlx::Result<T>> {
        use futures::StreamExt;
        match self {
            Conn::Postgres(c) => match arguments::<sqlx::Postgres>(args) {
                Ok(a) => sqlx::query_as_with(sql, a).fetch(&mut **c),
                Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
            },
            Conn::Sqlite(c) => match arguments::<sqlx::Sqlite>(args) {
                Ok(a) => sqlx::query_as_with(sql, a).fetch(&mut **c),
                Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
            },
        }
    }

    pub async fn fetch_optional<T: Decode>(
        &mut self,
        sql: impl SqlSafeStr,
        args: &[Arg],
    ) -> sqlx::Result<Option<T>> {
        match self {
            Conn::Postgres(c) => {
                sqlx::query_as_with(sql, arguments::<sqlx::Postgres>(args)?)
                    .fetch_optional(&mut **c)
                    .await
            }
            Conn::Sqlite(c) => {
                sqlx::query_as_with(sql, arguments::<sqlx::Sqlite>(args)?)
                    .fetch_optional(&mut **c)
                    .await
            }
        }
    }

    pub async fn fetch_one<T: Decode>(
        &mut self,
        sql: impl SqlSafeStr,
        args: &[Arg],
    ) -> sqlx::Result<T> {
        match self {
            Conn::Postgres(c) => {
                sqlx::query_as_with(sql, arguments::<sqlx::Postgres>(args)?)
                    .fetch_one(&mut **c)
                    .await
            }
            Conn::Sqlite(c) => {
                sqlx::query_as_with(sql, arguments::<sqlx::Sqlite>(args)?)
                    .fetch_one(&mut **c)
                    .await
            }
        }
    }
}

/// A pooled connection of either backend.
pub enum Pooled {
    Postgres(sqlx::pool::PoolConnection<sqlx::Postgres>),
    Sqlite(sqlx::pool::PoolConnection<sqlx::Sqlite>),
}

impl Pooled {
    pub fn conn(&mut self) -> Conn<'_> {
        match self {
            Pooled::Postgres(c) => Conn::Postgres(c),
            Pooled::Sqlite(c) => Conn::Sqlite(c),
        }
    }
}

/// A transaction of either backend.
pub enum Tx {
    Postgres(Transaction<'static, sqlx::Postgres>),
    Sqlite(Transaction<'static, sqlx::Sqlite>),
}

impl Tx {
    /// A write transaction. SQLite takes its write lock up front
    /// (`BEGIN IMMEDIATE`), or two readers upgrading at once deadlock.
    pub async fn write(db: &super::Db) -> sqlx::Result<Tx> {
        Ok(match db {
            super::Db::Postgres(pool) => Tx::Postgres(pool.begin().await?),
            super::Db::Sqlite(pool) => Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
        })
    }

    /// A read-only transaction whose statements all see one snapshot.
    pub async fn snapshot(db: &super::Db) -> sqlx::Result<Tx> {
        Ok(match db {
            super::Db::Postgres(pool) => Tx::Postgres(
                pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?,
            ),
            super::Db::Sqlite(pool) => Tx::Sqlite(pool.begin().await?),
        })
    }

    pub fn conn(&mut self) -> Conn<'_> {
        match self {
            Tx::Postgres(t) => Conn::Postgres(t),
            Tx::Sqlite(t) => Conn::Sqlite(t),
        }
    }

    pub async fn commit(self) -> sqlx::Result<()> {
        match self {
            Tx::Postgres(t) => t.commit().await,
            Tx::Sqlite(t) => t.commit().await,
        }
    }

    pub async fn rollback(self) -> sqlx::Result<()> {
        match self {
            Tx::Postgres(t) => t.rollback().await,
            Tx::Sqlite(t) => t.rollback().await,
        }
    }
}

/// A connection from the pool.
pub async fn acquire(db: &super::Db) -> sqlx::Result<Pooled> {
    Ok(match db {
        super::Db::Postgres(pool) => Pooled::Postgres(pool.acquire().await?),
        super::Db::Sqlite(pool) => Pooled::Sqlite(pool.acquire().await?),
    })
}

/// `($1, $2, …), ($k, …)`: placeholders for `rows` rows of `columns` values,
/// numbered from `first`.
pub fn values(rows: usize, columns: usize, first: usize) -> String {
    let mut out = String::with_capacity(rows * columns * 5);
    for row in 0..rows {
        out.push_str(if row == 0 { "(" } else { ", (" });
        for col in 0..columns {
            if col > 0 {
                out.push_str(", ");
            }
            out.push('$');
            out.push_str(&(first + row * columns + col).to_string());
        }
        out.push(')');
    }
    out
}

/// `$first, $first+1, …`: `n` placeholders for an `IN (…)` list.
pub fn list(n: usize, first: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_rows_in_order() {
        assert_eq!(values(2, 3, 1), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(values(1, 2, 4), "($4, $5)");
        assert_eq!(list(3, 2), "$2, $3, $4");
        assert_eq!(list(0, 1), "");
    }
}
