//! WAL positions: LSN text, and the commit record of a transaction.

pub fn lsn_to_u64(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').expect("lsn text");
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// Start LSN of transaction `xid`'s commit record, searched from `from` on (read
/// from the WAL with `pg_walinspect`, which Postgres ships since 15).
pub async fn commit_record_lsn(db: &tokio_postgres::Client, from: &str, xid: &str) -> u64 {
    // Several tests may create the extension at once: a lost race is fine.
    let _ = db
        .batch_execute("create extension if not exists pg_walinspect")
        .await;
    let row = db
        .query_one(
            "select start_lsn::text from pg_get_wal_records_info($1::text::pg_lsn, pg_current_wal_flush_lsn()) \
             where resource_manager = 'Transaction' and xid::text = $2 and record_type like 'COMMIT%'",
            &[&from, &xid],
        )
        .await
        .expect("the commit record of the transaction");
    lsn_to_u64(&row.get::<_, String>(0))
}
